"""Linear solvers on pytrees for ``H v = b`` with ``H = ∂²_yy g`` symmetric positive definite.

Each solver takes ``matvec: Tree -> Tree`` and returns ``(v, SolveInfo)``. Convergence checks need the
residual norm on the host; with ``tol=0`` the loops run a fixed number of iterations with no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from . import pytree as pt
from .pytree import Tree

MatVec = Callable[[Tree], Tree]


@dataclass
class SolveInfo:
    iterations: int
    matvecs: int
    residual: Optional[float] = None          # ‖H v − b‖ / ‖b‖ at exit, where computed
    residual_history: List[float] = field(default_factory=list)


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def conjugate_gradient(matvec: MatVec, b: Tree, x0: Optional[Tree] = None, tol: float = 1e-10,
                       maxiter: int = 100, record_history: bool = True) -> tuple[Tree, SolveInfo]:
    """Conjugate gradient for SPD ``H``: stops when ``‖r‖ ≤ tol·‖b‖`` or after ``maxiter`` steps.

    In exact arithmetic the error after k steps obeys
    ``‖v_k − v*‖_H ≤ 2 ((√κ − 1)/(√κ + 1))^k ‖v_0 − v*‖_H`` with κ the condition number of H.
    """
    _check_positive("tol", tol, allow_zero=True)
    _check_positive("maxiter", maxiter, allow_zero=True)
    if x0 is not None:
        pt.check_same_structure(x0, b, "x0", "b")
        x = pt.detach(x0)
        r = pt.sub(b, matvec(x))
        nmv = 1
    else:
        x = pt.zeros_like(b)
        r = {k: v.clone() for k, v in b.items()}
        nmv = 0
    p = {k: v.clone() for k, v in r.items()}
    rs = pt.dot(r, r)
    b_norm = pt.norm(b)
    history: List[float] = []
    threshold = tol * b_norm
    it = 0
    check = tol > 0 or record_history
    for it in range(1, maxiter + 1):
        if check:
            rn = torch.sqrt(rs)
            if record_history:
                history.append(float(rn / b_norm.clamp_min(torch.finfo(b_norm.dtype).tiny)))
            if tol > 0 and bool(rn <= threshold):
                it -= 1
                break
        Hp = matvec(p)
        nmv += 1
        alpha = rs / pt.dot(p, Hp)
        x = pt.axpy(alpha, p, x)
        r = pt.axpy(-alpha, Hp, r)
        rs_new = pt.dot(r, r)
        p = pt.axpy(rs_new / rs, p, r)
        rs = rs_new
    rel = float(torch.sqrt(rs) / b_norm.clamp_min(torch.finfo(b_norm.dtype).tiny))
    if record_history and (not history or history[-1] != rel):
        history.append(rel)
    return x, SolveInfo(iterations=it, matvecs=nmv, residual=rel, residual_history=history)


def neumann_series(matvec: MatVec, b: Tree, eta: float, terms: int) -> tuple[Tree, SolveInfo]:
    """Truncated Neumann series ``v_K = η Σ_{k=0}^{K−1} (I − ηH)^k b`` (``K = terms``).

    With ``0 < η ≤ 1/L`` (L = λ_max(H)) and μ = λ_min(H): ``‖v_K − H⁻¹b‖ ≤ (1 − ημ)^K ‖H⁻¹b‖``.
    Uses ``K − 1`` matrix-vector products.
    """
    _check_positive("eta", eta)
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms!r}")
    p = {k: v.clone() for k, v in b.items()}
    acc = {k: v.clone() for k, v in b.items()}
    for _ in range(terms - 1):
        p = pt.axpy(-eta, matvec(p), p)
        acc = pt.add(acc, p)
    return pt.scale(eta, acc), SolveInfo(iterations=terms, matvecs=terms - 1)


def fixed_point(matvec: MatVec, b: Tree, eta: float, tol: float = 1e-10, maxiter: int = 1000,
                x0: Optional[Tree] = None) -> tuple[Tree, SolveInfo]:
    """Richardson / fixed-point iteration ``v ← v − η (H v − b)`` until ``‖Hv − b‖ ≤ tol‖b‖``.

    This is the adjoint of differentiating the lower fixed-point map ``y ← y − η ∂_y g``; from
    ``v_0 = 0`` its k-th iterate equals the k-term Neumann series, but it stops on a residual test and
    can be warm-started from a previous solution ``x0``.
    """
    _check_positive("eta", eta)
    _check_positive("tol", tol, allow_zero=True)
    v = pt.zeros_like(b) if x0 is None else pt.detach(x0)
    b_norm = pt.norm(b).clamp_min(torch.finfo(next(iter(b.values())).dtype).tiny)
    history: List[float] = []
    it, rel = 0, None
    for it in range(1, maxiter + 1):
        r = pt.sub(matvec(v), b)
        rel_t = pt.norm(r) / b_norm
        if tol > 0:
            rel = float(rel_t)
            history.append(rel)
            if rel <= tol:
                return v, SolveInfo(iterations=it - 1, matvecs=it, residual=rel, residual_history=history)
        v = pt.axpy(-eta, r, v)
    return v, SolveInfo(iterations=it, matvecs=it, residual=rel, residual_history=history)


def dense_matrix(matvec: MatVec, like: Tree) -> torch.Tensor:
    """Materialise ``H`` (n×n, n = numel(like)) column by column; vectorised with ``vmap`` when the
    products support it, else one product per column."""
    n = pt.numel(like)
    ref = next(iter(like.values()))
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)

    def column(e: torch.Tensor) -> torch.Tensor:
        return pt.flatten(matvec(pt.unflatten(e, like)))

    try:
        H = torch.func.vmap(column)(eye).T
    except Exception:  # ops without batching rules: fall back to a loop over columns
        H = torch.stack([column(eye[i]) for i in range(n)], dim=1)
    return H


def dense_solve(matvec: MatVec, b: Tree, max_dim: int = 20000) -> tuple[Tree, SolveInfo]:
    """Exact solve: materialise H (n products) and call ``torch.linalg.solve``. For small n only."""
    n = pt.numel(b)
    if n > max_dim:
        raise ValueError(f"dense_solve would build a {n}×{n} Hessian (max_dim={max_dim}); use the "
                         "'cg' estimator for large lower levels, or raise max_dim")
    H = dense_matrix(matvec, b)
    H = 0.5 * (H + H.T)
    v = torch.linalg.solve(H, pt.flatten(b))
    res = float(torch.linalg.norm(H @ v - pt.flatten(b)) / torch.linalg.norm(pt.flatten(b)).clamp_min(1e-300))
    return pt.unflatten(v, b), SolveInfo(iterations=1, matvecs=n, residual=res)
