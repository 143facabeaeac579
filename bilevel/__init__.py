"""Bilevel optimisation on ``torch.func``.

    min_x F(x) = f(x, y*(x))   s.t.   y*(x) ∈ argmin_y g(x, y)

* :class:`BilevelProblem` — the two losses ``(x, y, batch) -> scalar``, x and y dicts of tensors;
* :mod:`bilevel.estimators` — hypergradient estimators by name (``exact``, ``cg``, ``neumann``,
  ``fixed-point``, ``unrolled``, ``stochastic-neumann``, ``first-order``) behind one interface;
* :mod:`bilevel.linear_solvers` — CG, Neumann, fixed point and dense solves on pytrees;
* :func:`custom_root` — implicit differentiation of any solver inside autograd (jaxopt/torchopt style);
* :mod:`bilevel.solvers` — stochastic bilevel solvers (``soba``, ``amigo``, ``stocbio``, ``alternating``);
* :class:`LowerSolver` — warm-started lower-level optimisation with torchopt functional optimizers;
* :mod:`bilevel.frank_wolfe` — projection-free constrained upper-level solvers.
"""
from . import estimators, linear_solvers, pytree, solvers
from .batches import BatchStream
from .implicit_diff import custom_root
from .lower import LowerInfo, LowerSolver
from .problem import BilevelProblem, LowerOperators

__all__ = ["custom_root", "BilevelProblem", "LowerOperators", "LowerSolver", "LowerInfo", "BatchStream",
           "estimators", "linear_solvers", "pytree", "solvers"]

try:  # the Frank-Wolfe subpackage is optional while it is being built
    from . import frank_wolfe  # noqa: F401
    __all__.append("frank_wolfe")
except ImportError:  # pragma: no cover
    pass
