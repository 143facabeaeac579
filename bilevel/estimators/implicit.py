"""Implicit-differentiation estimators: solve ``H v = ∂_y f`` then ``∇F ≈ ∂_x f − ∂²_xy g · v``.

They differ only in how the inverse-Hessian-vector product ``v ≈ [∂²_yy g]⁻¹ ∂_y f`` is computed:

* ``exact``        dense Hessian + ``torch.linalg.solve`` (small lower levels; the reference);
* ``cg``           conjugate gradient (tolerance / iteration budget);
* ``neumann``      truncated Neumann series ``η Σ_{k<K} (I − ηH)^k ∂_y f``;
* ``fixed-point``  Richardson iteration to a residual tolerance, optionally warm-started.
"""
from __future__ import annotations

from typing import Any, Optional

from .. import _checks as _c
from .. import linear_solvers as ls
from .. import pytree as pt
from ..problem import BilevelProblem, no_autocast
from ..pytree import Tree
from .base import (Estimator, EstimatorInfo, EstimatorState, HvpModeOption, check_damping, check_eta,
                   draw)


class ImplicitEstimator(HvpModeOption, Estimator):
    """Base of the implicit estimators: subclasses implement :meth:`solve` for ``H v = ∂_y f``."""

    def solve(self, matvec, b: Tree, ops=None, x0: Optional[Tree] = None):  # -> (v, SolveInfo)
        raise NotImplementedError

    #: whether :meth:`solve` uses a warm start ``x0`` (the previous solution, kept in the state)
    warm_start: bool = False

    #: Tikhonov damping λ ≥ 0: solve (∂²_yy g + λI) v = ∂_y f. For non-convex or rank-deficient lower
    #: levels (e.g. low-rank factorisations, whose scaling symmetry makes ∂²_yy g singular) λ > 0
    #: keeps the solve well posed at the price of a bias O(λ‖v‖). Set as a keyword of every subclass.
    damping: float = 0.0

    def _set_damping(self, damping: float) -> None:
        self.damping = check_damping(damping)

    def estimate_with_state(self, problem: BilevelProblem, x: Tree, y: Tree, upper_batch: Any,
                            lower_batch: Any, state: EstimatorState):
        gx, gy, value = problem.upper_grads(x, y, upper_batch)
        with no_autocast():      # the solve in the dtype of y (float32 under a bf16 autocast)
            grad, info, v = self._implicit(problem, x, y, gy, gx, value, lower_batch,
                                           _warm(state.warm, gy) if self.warm_start else None, state)
        warm = pt.detach(v) if self.warm_start else None
        return grad, info, EstimatorState(step=state.step + 1, warm=warm, rng=state.rng,
                                          iterations=info.iterations)

    def _implicit(self, problem, x, y, gy, gx, value, lower_batch, x0, state=None):
        ops = problem.operators(x, y, draw(lower_batch), hvp_mode=self.hvp_mode)
        lam = self.damping
        if lam > 0:
            def matvec(v: Tree) -> Tree:
                return pt.axpy(lam, v, ops.hvp(v))

            def batched(V: Tree) -> Tree:
                HV = ops.hvp_batched(V)
                return {k: HV[k] + lam * V[k] for k in HV}
            ops_for_solve = _DampedOps(batched)
        else:
            matvec, ops_for_solve = ops.hvp, ops
        materialized = self._should_materialize(gy, state)
        if materialized:
            # H built once (n products, vectorised); the solver then runs its usual iterations on H,
            # as one flat vector (same iterates, no autograd call per iteration)
            H = ls.dense_matrix(matvec, gy, ops_for_solve.hvp_batched)
            x0f = None if x0 is None else {"v": pt.flatten(x0, like=gy)}
            vf, sinfo = self.solve(lambda u: {"v": H @ u["v"]}, {"v": pt.flatten(gy)}, None, x0=x0f)
            v = pt.unflatten(vf["v"], gy)
            sinfo.matvecs = H.shape[0]           # products spent building H; the solve's are free
        else:
            v, sinfo = self.solve(matvec, gy, ops_for_solve, x0=x0)
        mixed = ops.mixed(v)
        grad = {k: gx[k] - mixed[k] for k in gx}
        info = EstimatorInfo(hvp_count=max(ops.hvp_count, sinfo.matvecs), mixed_count=ops.mixed_count,
                             iterations=sinfo.iterations, residual=sinfo.residual,
                             residual_history=sinfo.residual_history, upper_value=value)
        if sinfo.negative_curvature is not None:      # reported by solvers that can detect it (CG)
            info.extra["negative_curvature"] = sinfo.negative_curvature
        if lam > 0:
            info.extra["damping"] = lam
        if materialized:
            info.extra["materialized"] = True
        return grad, info, v

    # -- materialising a small Hessian ------------------------------------------------------------------
    #: ``"auto"``: build ∂²_yy g densely (one vectorised batch of n = numel(y) products, then the
    #: solver's iterations on the n×n matrix, no autograd call each) when n ≤ MATERIALIZE_MAX and the
    #: expected number of products is at least n/2: the fixed budget (``tol=0``, Neumann terms), else
    #: the previous call's iterations (``state.iterations``; ``maxiter`` on the first call). At these
    #: sizes products are often overhead-bound: the batched build of n = 100 columns cost as much as
    #: 10–30 sequential products on CPU (quadratic, ridge), but on a loss over 1024 samples it cost more
    #: than 29, hence the conservative n/2. The rule is deterministic (no timing), so runs stay
    #: reproducible across processes. ``"always"`` / ``"never"`` force the choice.
    materialize: str = "never"
    MATERIALIZE_MAX = 512

    def _budget(self) -> Optional[int]:   # products the solver may spend; None: not applicable
        return None

    def _set_materialize(self, materialize: str) -> None:
        self.materialize = _c.choice("materialize", materialize, ("auto", "always", "never"))

    def _should_materialize(self, b: Tree, state=None) -> bool:
        if self.materialize == "never" or self._budget() is None:
            return False
        n = pt.numel(b)
        if self.materialize == "always":
            return True
        expected = self._budget()
        if getattr(self, "tol", 0) > 0 and state is not None and state.step > 0:
            expected = min(expected, state.iterations)
        return n <= self.MATERIALIZE_MAX and 2 * expected >= n


class _DampedOps:
    """Stands in for :class:`LowerOperators` inside ``solve`` when damping is on (batched products only)."""

    def __init__(self, hvp_batched):
        self.hvp_batched = hvp_batched


class Exact(ImplicitEstimator):
    """Dense implicit hypergradient: materialises ``∂²_yy g`` (n = numel(y) products, vectorised)."""

    name = "exact"

    options = ("max_dim", "hvp_mode", "damping")

    def __init__(self, max_dim: int = 20000, hvp_mode: str = "auto", damping: float = 0.0):
        self.max_dim, self.hvp_mode = _c.integer("max_dim", max_dim, 1), hvp_mode
        self._set_damping(damping)

    def solve(self, matvec, b, ops=None, x0=None):
        return ls.dense_solve(matvec, b, max_dim=self.max_dim,
                              batched_matvec=None if ops is None else ops.hvp_batched)


def _warm(last: Optional[Tree], b: Tree) -> Optional[Tree]:
    """The previous solution if it still fits ``b`` (same keys, shapes, dtypes: not after a
    truncation); compared as sets of leaves, so a different key order still fits."""
    if last is None or set(last) != set(b):
        return None
    last = pt.reorder(last, b)
    return last if pt.signature(last) == pt.signature(b) else None


class ConjugateGradient(ImplicitEstimator):
    """CG on ``∂²_yy g v = ∂_y f`` to ``‖r‖ ≤ tol‖∂_y f‖`` or ``maxiter`` products.

    Error after k products (exact arithmetic): ``‖v_k − v*‖_H ≤ 2((√κ−1)/(√κ+1))^k ‖v*‖_H``.
    ``warm_start=True`` starts from the previous call's solution; ``tol=0`` runs exactly ``maxiter``
    products with no host sync; ``check_every`` spaces out the tolerance tests (one sync each).
    """

    name = "cg"

    options = ("tol", "maxiter", "warm_start", "hvp_mode", "check_every", "damping", "materialize")

    def __init__(self, tol: float = 1e-10, maxiter: int = 100, warm_start: bool = False,
                 hvp_mode: str = "auto", check_every: int = 1, damping: float = 0.0,
                 materialize: str = "auto"):
        self._set_damping(damping)
        self._set_materialize(materialize)
        self.maxiter = _c.integer("maxiter", maxiter, 0)
        self.tol = _c.number("tol", tol, nonnegative=True, hint=" (relative residual; 0 = fixed budget)")
        self.warm_start, self.hvp_mode = _flag("warm_start", warm_start), hvp_mode
        self.check_every = _c.integer("check_every", check_every, 1)

    def _budget(self):
        return self.maxiter

    def solve(self, matvec, b, ops=None, x0=None):
        return ls.conjugate_gradient(matvec, b, x0=x0, tol=self.tol, maxiter=self.maxiter,
                                     check_every=self.check_every)


class Neumann(ImplicitEstimator):
    """Truncated Neumann series ``v_K = η Σ_{k<K} (I − ηH)^k ∂_y f`` with step ``eta`` (η ≤ 1/λ_max(H))
    and ``terms`` = K terms (K − 1 products). Error: ``‖v_K − v*‖ ≤ (1 − ημ)^K ‖v*‖``, μ = λ_min(H)."""

    name = "neumann"

    options = ("eta", "terms", "hvp_mode", "damping", "materialize")

    def __init__(self, eta: float = 0.1, terms: int = 20, hvp_mode: str = "auto", damping: float = 0.0,
                 materialize: str = "auto"):
        self._set_damping(damping)
        self._set_materialize(materialize)
        self.eta, self.terms, self.hvp_mode = check_eta(eta), _c.integer("terms", terms, 1), hvp_mode

    def _budget(self):
        return self.terms - 1

    def solve(self, matvec, b, ops=None, x0=None):
        return ls.neumann_series(matvec, b, self.eta, self.terms)


class FixedPoint(ImplicitEstimator):
    """Fixed-point (Richardson) iteration ``v ← v − η(Hv − ∂_y f)`` to a residual tolerance."""

    name = "fixed-point"
    options = ("eta", "tol", "maxiter", "warm_start", "hvp_mode", "check_every", "damping", "materialize")

    def __init__(self, eta: float = 0.1, tol: float = 1e-8, maxiter: int = 1000,
                 warm_start: bool = False, hvp_mode: str = "auto", check_every: int = 1,
                 damping: float = 0.0, materialize: str = "auto"):
        self._set_damping(damping)
        self._set_materialize(materialize)
        self.eta = check_eta(eta)
        self.tol = _c.number("tol", tol, nonnegative=True, hint=" (relative residual; 0 = fixed budget)")
        self.maxiter = _c.integer("maxiter", maxiter, 0)
        self.warm_start, self.hvp_mode = _flag("warm_start", warm_start), hvp_mode
        self.check_every = _c.integer("check_every", check_every, 1)

    def _budget(self):
        return self.maxiter

    def solve(self, matvec, b, ops=None, x0=None):
        return ls.fixed_point(matvec, b, self.eta, tol=self.tol, maxiter=self.maxiter, x0=x0,
                              check_every=self.check_every)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
