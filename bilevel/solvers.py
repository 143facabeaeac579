"""Stochastic bilevel solvers: one object per method, explicit state, one call per outer iteration.

    solver = bilevel.solvers.get("soba", outer_lr=0.01, inner_lr=0.1, linear_lr=0.1)
    state = solver.init(problem, x, y)
    for _ in range(n):
        state, info = solver.step(problem, state, upper_batches, lower_batches)
    state.x, state.y                      # info.oracle_calls: derivative evaluations this step

Methods (as in benchopt's benchmark_bilevel; ``ρ`` = ``inner_lr``, ``η`` = ``linear_lr``, ``γ`` = ``outer_lr``,
``ξ`` lower and ``ζ`` upper mini-batches; v approximates ``[∂²_yy g]⁻¹ ∂_y f``):

* ``soba`` (Dagréou et al. 2022), single loop, all three directions at the current point on one ξ, one ζ:
  ``y ← y − ρ ∂_y g``,  ``v ← v − η (∂²_yy g v − ∂_y f)``,  ``x ← x − γ (∂_x f − ∂²_xy g v)``.
* ``amigo`` (Arbel & Mairal 2022): ``linear_steps`` SGD steps on v (a fresh ξ each, warm-started),
  ``x ← x − γ (∂_x f − ∂²_xy g v)``, then ``inner_steps`` SGD steps on y at the new x.
* ``stocbio`` (Ji et al. 2021): ``inner_steps`` SGD steps on y, then v from the ``terms``-term Neumann
  series with step η and a fresh ξ per product (``stochastic-neumann`` in ``stocbio`` mode), x step.
* ``alternating``: ``inner_steps`` SGD steps on y, any estimator (``estimator=`` name or object, with its
  own explicit state, e.g. a CG warm start), x step.

``lower_batch`` / ``upper_batch`` are single batches or iterators (each product draws its own batch from
an iterator; a single lower batch is reused, with a warning for the methods that draw several).
``state`` is a :class:`SolverState` of tensors and ints (``to_dict``/``from_dict``, checkpointable).
No host sync inside a step except the estimator's own in ``alternating``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from . import _checks as _c
from . import pytree as pt
from .estimators import get as get_estimator
from .estimators.base import EstimatorState, _Prepend, draw, is_batch_iterator
from .estimators.stochastic import StochasticNeumann
from .problem import BilevelProblem
from .pytree import Tree


@dataclass(frozen=True)
class SolverState:
    """``x``, ``y``, the linear-system variable ``v`` (None where unused), the step count and the
    estimator's state (``alternating``). Plain data: ``to_dict()`` holds tensors, ints and dicts."""

    x: Dict[str, torch.Tensor]
    y: Dict[str, torch.Tensor]
    v: Optional[Dict[str, torch.Tensor]] = None
    step: int = 0
    estimator: Optional[EstimatorState] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"x": dict(self.x), "y": dict(self.y), "v": None if self.v is None else dict(self.v),
                "step": int(self.step),
                "estimator": None if self.estimator is None else self.estimator.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SolverState":
        unknown = sorted(set(d) - {"x", "y", "v", "step", "estimator"})
        if unknown:
            raise ValueError(f"unknown SolverState fields {unknown}; expected x, y, v, step, estimator")
        for name in ("x", "y"):
            pt.check_tree(d[name], f"state['{name}']")
        est = d.get("estimator")
        return cls(x=dict(d["x"]), y=dict(d["y"]), v=None if d.get("v") is None else dict(d["v"]),
                   step=_c.integer("state['step']", d.get("step", 0), 0),
                   estimator=None if est is None else EstimatorState.from_dict(est))


@dataclass
class SolverInfo:
    """What one step used. ``oracle_calls`` = lower gradients + upper gradients + Hessian-vector +
    mixed products (each one derivative evaluation on one mini-batch)."""

    lower_grads: int = 0
    upper_grads: int = 0
    hvp_count: int = 0
    mixed_count: int = 0
    upper_value: Optional[torch.Tensor] = None     # f at the step's start, 0-dim (no host sync)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def oracle_calls(self) -> int:
        return self.lower_grads + self.upper_grads + self.hvp_count + self.mixed_count


def _lr(name: str, value) -> float:
    return _c.number(name, value, positive=True)


class BilevelSolver:
    """Base: ``init`` builds the state; subclasses implement ``_step``."""

    name = "solver"
    uses_v = True
    options: tuple = ()

    def init(self, problem: BilevelProblem, x: Tree, y: Tree) -> SolverState:
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        pt.check_tree(x, "x")
        pt.check_tree(y, "y")
        pt.check_dtypes({"x": x, "y": y})
        return SolverState(x=pt.detach(x), y=pt.detach(y),
                           v=pt.zeros_like(pt.detach(y)) if self.uses_v else None, step=0)

    def step(self, problem: BilevelProblem, state: SolverState, upper_batch: Any, lower_batch: Any,
             **kwargs):
        """One outer iteration: returns ``(new_state, SolverInfo)``."""
        if not isinstance(state, SolverState):
            raise TypeError(f"state must be a bilevel.solvers.SolverState (from solver.init), got "
                            f"{type(state).__name__}")
        if problem.needs_validation(state.x, state.y):
            first = draw(lower_batch)
            problem.validate(state.x, state.y, _peek(upper_batch), first)
            if is_batch_iterator(lower_batch):
                lower_batch = _Prepend(first, lower_batch)
        return self._step(problem, state, upper_batch, lower_batch, **kwargs)

    def _step(self, problem, state, upper_batch, lower_batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _warn_single(self, lower_batch) -> None:
        if not is_batch_iterator(lower_batch):
            warnings.warn(f"{self.name} got a single lower batch and reuses it for every product and "
                          "inner step of the iteration; pass an iterator, e.g. bilevel.BatchStream(batches)",
                          UserWarning, stacklevel=4)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options if hasattr(self, k))
        return f"{type(self).__name__}({opts})"


def _peek(batch):
    """A batch for validating the upper loss without consuming an iterator's element."""
    return None if is_batch_iterator(batch) else batch


def _sgd_y(problem, x, y, lower_batch, lr, steps):
    for _ in range(steps):
        gy, _ = problem.lower_value_and_grad_y(x, y, draw(lower_batch))
        y = pt.axpy(-lr, gy, y)
    return y


class SOBA(BilevelSolver):
    name = "soba"
    options = ("outer_lr", "inner_lr", "linear_lr", "hvp_mode")

    def __init__(self, outer_lr: float, inner_lr: float, linear_lr: Optional[float] = None,
                 hvp_mode: str = "auto"):
        self.outer_lr, self.inner_lr = _lr("outer_lr", outer_lr), _lr("inner_lr", inner_lr)
        self.linear_lr = self.inner_lr if linear_lr is None else _lr("linear_lr", linear_lr)
        self.hvp_mode = hvp_mode
        from .problem import HVP_MODES
        _c.choice("hvp_mode", hvp_mode, HVP_MODES)

    def _step(self, problem, state, upper_batch, lower_batch):
        x, y, v = state.x, state.y, state.v
        ops = problem.operators(x, y, draw(lower_batch), self.hvp_mode)
        gy_g = ops.grad_y()
        Hv, Cv = ops.hvp_and_mixed(v)
        gx_f, gy_f, value = problem.upper_grads(x, y, draw(upper_batch))
        y_new = pt.axpy(-self.inner_lr, gy_g, y)
        v_new = pt.axpy(-self.linear_lr, pt.sub(Hv, gy_f), v)
        x_new = pt.axpy(-self.outer_lr, pt.sub(gx_f, Cv), x)
        info = SolverInfo(lower_grads=1, upper_grads=1, hvp_count=1, mixed_count=1, upper_value=value)
        return SolverState(x=x_new, y=y_new, v=v_new, step=state.step + 1), info


class AmIGO(BilevelSolver):
    name = "amigo"
    options = ("outer_lr", "inner_lr", "linear_lr", "inner_steps", "linear_steps", "hvp_mode")

    def __init__(self, outer_lr: float, inner_lr: float, linear_lr: Optional[float] = None,
                 inner_steps: int = 10, linear_steps: Optional[int] = None, hvp_mode: str = "auto"):
        self.outer_lr, self.inner_lr = _lr("outer_lr", outer_lr), _lr("inner_lr", inner_lr)
        self.linear_lr = self.inner_lr if linear_lr is None else _lr("linear_lr", linear_lr)
        self.inner_steps = _c.integer("inner_steps", inner_steps, 1)
        self.linear_steps = self.inner_steps if linear_steps is None else \
            _c.integer("linear_steps", linear_steps, 1)
        from .problem import HVP_MODES
        self.hvp_mode = _c.choice("hvp_mode", hvp_mode, HVP_MODES)

    def _step(self, problem, state, upper_batch, lower_batch):
        self._warn_single(lower_batch)
        x, y, v = state.x, state.y, state.v
        gx_f, gy_f, value = problem.upper_grads(x, y, draw(upper_batch))
        for _ in range(self.linear_steps):
            Hv = problem.operators(x, y, draw(lower_batch), self.hvp_mode).hvp(v)
            v = pt.axpy(-self.linear_lr, pt.sub(Hv, gy_f), v)
        Cv = problem.operators(x, y, draw(lower_batch), self.hvp_mode).mixed(v)
        x = pt.axpy(-self.outer_lr, pt.sub(gx_f, Cv), x)
        y = _sgd_y(problem, x, y, lower_batch, self.inner_lr, self.inner_steps)
        info = SolverInfo(lower_grads=self.inner_steps, upper_grads=1, hvp_count=self.linear_steps,
                          mixed_count=1, upper_value=value)
        return SolverState(x=x, y=y, v=v, step=state.step + 1), info


class Alternating(BilevelSolver):
    """``inner_steps`` SGD steps on y, then ``estimator`` (any name or object), then an x step.

    ``step(..., estimator_batch=b)`` hands the estimator its own lower batch(es) (e.g. the full
    training set for a CG solve, while the inner SGD steps draw mini-batches from ``lower_batch``)."""

    name = "alternating"
    uses_v = False
    options = ("outer_lr", "inner_lr", "inner_steps", "estimator", "estimator_options")

    def __init__(self, outer_lr: float, inner_lr: float, inner_steps: int = 10, estimator="cg",
                 estimator_options: Optional[dict] = None):
        self.outer_lr, self.inner_lr = _lr("outer_lr", outer_lr), _lr("inner_lr", inner_lr)
        self.inner_steps = _c.integer("inner_steps", inner_steps, 0)
        self.estimator_options = dict(estimator_options or {})
        self.estimator = get_estimator(estimator, **self.estimator_options)

    def init(self, problem, x, y):
        st = super().init(problem, x, y)
        return SolverState(x=st.x, y=st.y, v=None, step=0, estimator=self.estimator.init(st.x, st.y))

    def _step(self, problem, state, upper_batch, lower_batch, estimator_batch=None):
        if self.inner_steps > 1:
            self._warn_single(lower_batch)
        x = state.x
        y = _sgd_y(problem, x, state.y, lower_batch, self.inner_lr, self.inner_steps)
        res = self.estimator(problem, x, y, draw(upper_batch),
                             lower_batch if estimator_batch is None else estimator_batch,
                             state=state.estimator)
        x = pt.axpy(-self.outer_lr, res.grad, x)
        info = SolverInfo(lower_grads=self.inner_steps, upper_grads=1, hvp_count=res.info.hvp_count,
                          mixed_count=res.info.mixed_count, upper_value=res.info.upper_value,
                          extra={"estimator": res.info})
        return SolverState(x=x, y=y, v=None, step=state.step + 1, estimator=res.state), info


class StocBiO(Alternating):
    """Alternating with the StocBiO hypergradient: ``terms``-term Neumann series with step
    ``linear_lr`` and an independent lower batch per product."""

    name = "stocbio"
    options = ("outer_lr", "inner_lr", "linear_lr", "inner_steps", "terms", "seed")

    def __init__(self, outer_lr: float, inner_lr: float, linear_lr: Optional[float] = None,
                 inner_steps: int = 10, terms: int = 10, seed: Optional[int] = None):
        linear_lr = inner_lr if linear_lr is None else linear_lr
        self.linear_lr = _lr("linear_lr", linear_lr)
        self.terms = _c.integer("terms", terms, 1)
        super().__init__(outer_lr, inner_lr, inner_steps,
                         StochasticNeumann(eta=self.linear_lr, terms=self.terms, mode="stocbio",
                                           seed=0 if seed is None else seed))
        self.seed = seed


_SOLVERS = {c.name: c for c in (SOBA, AmIGO, StocBiO, Alternating)}


def available() -> List[str]:
    return sorted(_SOLVERS)


def get(name: str, **options) -> BilevelSolver:
    """A bilevel solver by name with options (``outer_lr``, ``inner_lr``, ``linear_lr``, ...)."""
    if isinstance(name, BilevelSolver):
        if options:
            raise ValueError("options were given together with a solver object; configure the object")
        return name
    if name not in _SOLVERS:
        raise ValueError(f"unknown bilevel solver {name!r}; available: {', '.join(available())}")
    cls = _SOLVERS[name]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise TypeError(f"bad options for solver {name!r}: it does not take {unknown}; it accepts "
                        f"{list(cls.options)}")
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"bad options for solver {name!r}: {err}") from None


__all__ = ["SolverState", "SolverInfo", "BilevelSolver", "SOBA", "AmIGO", "StocBiO", "Alternating",
           "available", "get"]
