"""Generic estimators of the constants in the paper's assumptions and theorems.

Everything here works on flat vectors and matrix-free operators ``matvec: Tensor -> Tensor`` (or on
callables returning gradients), knows nothing about adapters, and is tested on problems where the
constant is known in closed form (``tests/test_theory_constants.py``).

* ``K = ‖∇²L2(Ψ*)‖``            -> :func:`spectral_norm` (dense, or Lanczos / power iteration)
* ``β = ‖(∂_Ψ L2 · ∂²_B Ψ)⁻¹‖``   -> :func:`inverse_norm` (dense, or Lanczos on A²)
* ``M`` (Lipschitz const. of ∇F) -> :func:`hessian_norm_fd`, :func:`secant_lipschitz`
* ``χ² = sup_s E[e(s, s̄)²]``     -> :func:`chi_squared`
* FW gap, log-log slope with CI, support identification, strict-complementarity margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]

DENSE_MAX = 2500   # operators up to this size are materialised and eigen-decomposed exactly


@dataclass
class SpectralInfo:
    value: float
    method: str
    iterations: int = 0
    converged: bool = True
    extra: dict = field(default_factory=dict)


def dense_operator(matvec: MatVec, n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Materialise a (symmetric) operator column by column and symmetrise it."""
    eye = torch.eye(n, dtype=dtype, device=device)
    try:
        H = torch.func.vmap(matvec)(eye).T
    except Exception:  # products without batching rules
        H = torch.stack([matvec(eye[i]) for i in range(n)], dim=1)
    return 0.5 * (H + H.T)


def _scipy_op(matvec: MatVec, n: int, dtype, device, square: bool = False):
    from scipy.sparse.linalg import LinearOperator

    def mv(v):
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=dtype, device=device)
        out = matvec(t)
        if square:
            out = matvec(out)
        return out.detach().double().cpu().numpy()

    return LinearOperator((n, n), matvec=mv, dtype=np.float64)


def power_iteration(matvec: MatVec, n: int, iters: int = 100, tol: float = 1e-6,
                    dtype=torch.float64, device="cpu", seed: int = 0) -> SpectralInfo:
    """Largest |eigenvalue| of a symmetric operator by power iteration (Rayleigh quotient).

    Converged when the relative change of the estimate is below ``tol``. For a PSD operator this is
    ``λ_max``; cost: one product per iteration.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    v = v / v.norm()
    lam_old, lam = 0.0, 0.0
    for it in range(1, iters + 1):
        w = matvec(v)
        lam = float(torch.dot(v, w))
        nrm = float(w.norm())
        if nrm == 0.0:
            return SpectralInfo(0.0, "power", it, True)
        v = w / nrm
        if it > 1 and abs(abs(lam) - abs(lam_old)) <= tol * max(abs(lam), 1e-300):
            return SpectralInfo(abs(lam), "power", it, True)
        lam_old = lam
    return SpectralInfo(abs(lam), "power", iters, False)


def spectral_norm(matvec: MatVec, n: int, method: str = "auto", dtype=torch.float64, device="cpu",
                  iters: int = 100, tol: float = 1e-6) -> SpectralInfo:
    """``‖A‖ = max |λ(A)|`` of a symmetric operator: dense (n ≤ DENSE_MAX), Lanczos or power."""
    if method == "auto":
        method = "dense" if n <= DENSE_MAX else "lanczos"
    if method == "dense":
        H = dense_operator(matvec, n, dtype, device).double()
        ev = torch.linalg.eigvalsh(H)
        return SpectralInfo(float(ev.abs().max()), "dense", n, True,
                            {"lambda_min": float(ev[0]), "lambda_max": float(ev[-1])})
    if method == "power":
        return power_iteration(matvec, n, iters, tol, dtype, device)
    if method == "lanczos":
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh
        op = _scipy_op(matvec, n, dtype, device)
        try:
            vals = eigsh(op, k=1, which="LM", maxiter=iters, tol=tol, return_eigenvectors=False)
            return SpectralInfo(float(abs(vals[0])), "lanczos", iters, True)
        except ArpackNoConvergence as err:
            vals = err.eigenvalues
            if len(vals):
                return SpectralInfo(float(np.abs(vals).max()), "lanczos", iters, False)
            return power_iteration(matvec, n, iters, tol, dtype, device)
    raise ValueError(f"method={method!r} is not one of 'auto', 'dense', 'power', 'lanczos'")


def lanczos_ritz(matvec: MatVec, n: int, steps: int = 40, dtype=torch.float64, device="cpu",
                 seed: int = 0) -> torch.Tensor:
    """Ritz values (ascending) of ``steps`` Lanczos steps with full reorthogonalisation: a fixed,
    predictable cost of ``steps`` products. The extreme Ritz values bracket inwards: λ_max(Ritz) ≤
    λ_max(A) and λ_min(Ritz) ≥ λ_min(A), with fast convergence for well-separated extremes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    Q = [q / q.norm()]
    alphas, betas = [], []
    for j in range(min(steps, n)):
        w = matvec(Q[j])
        a = torch.dot(w, Q[j])
        alphas.append(float(a))
        Qm = torch.stack(Q, 1)
        w = w - Qm @ (Qm.T @ w)
        w = w - Qm @ (Qm.T @ w)
        b = float(w.norm())
        if b < 1e-12 * max(abs(alphas[-1]), 1e-300) or j == min(steps, n) - 1:
            break
        betas.append(b)
        Q.append(w / b)
    k = len(alphas)
    Tm = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        Tm += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(Tm)


def extreme_eigenvalue(matvec: MatVec, n: int, which: str = "SA", dtype=torch.float64, device="cpu",
                       iters: int = 300, tol: float = 1e-6) -> SpectralInfo:
    """Smallest ('SA') or largest ('LA') eigenvalue of a symmetric operator (dense or Lanczos)."""
    if n <= DENSE_MAX:
        ev = torch.linalg.eigvalsh(dense_operator(matvec, n, dtype, device).double())
        return SpectralInfo(float(ev[0] if which == "SA" else ev[-1]), "dense", n, True)
    if which in ("SA-ritz", "LA-ritz"):
        ev = lanczos_ritz(matvec, n, iters, dtype, device)
        return SpectralInfo(float(ev[0] if which == "SA-ritz" else ev[-1]), f"lanczos-{iters}", iters, False)
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh
    op = _scipy_op(matvec, n, dtype, device)
    try:
        vals = eigsh(op, k=1, which=which, maxiter=iters, tol=tol, return_eigenvectors=False)
        return SpectralInfo(float(vals[0]), "lanczos", iters, True)
    except ArpackNoConvergence as err:
        vals = err.eigenvalues
        v = float(vals[0]) if len(vals) else float("nan")
        return SpectralInfo(v, "lanczos", iters, False)


def inverse_norm(matvec: MatVec, n: int, method: str = "auto", dtype=torch.float64, device="cpu",
                 iters: int = 500, tol: float = 1e-8, zero_tol: float = 1e-10) -> SpectralInfo:
    """``β = ‖A⁻¹‖ = 1 / min |λ(A)|`` of a symmetric (possibly indefinite) operator.

    Dense when small; otherwise Lanczos for the smallest eigenvalue of ``A²`` (PSD), so that
    ``β = 1/√λ_min(A²)``. Returns ``inf`` when ``min|λ| ≤ zero_tol · max|λ|`` (A singular to working
    precision); ``extra['min_abs']`` is the smallest |eigenvalue|.
    """
    if method == "auto":
        method = "dense" if n <= DENSE_MAX else "lanczos"
    if method == "dense":
        ev = torch.linalg.eigvalsh(dense_operator(matvec, n, dtype, device).double()).abs()
        lo, hi = float(ev.min()), float(ev.max())
        beta = math.inf if lo <= zero_tol * max(hi, 1e-300) else 1.0 / lo
        return SpectralInfo(beta, "dense", n, True, {"min_abs": lo, "max_abs": hi})
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh
    op = _scipy_op(matvec, n, dtype, device, square=True)
    converged = True
    try:
        vals = eigsh(op, k=1, which="SA", maxiter=iters, tol=tol, return_eigenvectors=False)
    except ArpackNoConvergence as err:
        vals, converged = err.eigenvalues, False
    hi = spectral_norm(matvec, n, "lanczos", dtype, device, iters=100).value
    if not len(vals):
        return SpectralInfo(float("nan"), "lanczos-A2", iters, False, {"max_abs": hi})
    lo = math.sqrt(max(float(vals[0]), 0.0))
    beta = math.inf if lo <= zero_tol * max(hi, 1e-300) else 1.0 / lo
    return SpectralInfo(beta, "lanczos-A2", iters, converged, {"min_abs": lo, "max_abs": hi})


# ------------------------------------------------------------------------------------------------
# Lipschitz constant M of ∇F
# ------------------------------------------------------------------------------------------------
def hessian_norm_fd(grad_fn: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor, h: float = 1e-4,
                    iters: int = 30, tol: float = 1e-4, seed: int = 0) -> SpectralInfo:
    """Local ``‖∇²F(s)‖`` by power iteration on central finite differences of the gradient,
    ``∇²F(s) v ≈ (∇F(s + h v) − ∇F(s − h v)) / 2h`` (‖v‖ = 1). A local value of M."""
    n = s.numel()

    def hv(v):
        return ((grad_fn(s + h * v) - grad_fn(s - h * v)) / (2 * h)).reshape(-1)

    if n <= 8:   # exact eigen-decomposition of the (symmetrised) FD Hessian: n+... gradient pairs
        H = torch.stack([hv(torch.eye(n, dtype=s.dtype)[i]) for i in range(n)], 1).double()
        H = 0.5 * (H + H.T)
        ev = torch.linalg.eigvalsh(H)
        return SpectralInfo(float(ev.abs().max()), "fd-dense", 2 * n, True,
                            {"lambda_min": float(ev[0]), "lambda_max": float(ev[-1])})
    return power_iteration(lambda v: hv(v.to(s.dtype)).to(v.dtype), n, iters, tol, seed=seed)


def secant_lipschitz(points: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     min_step: float = 1e-12) -> List[float]:
    """``‖∇F(s_{n+1}) − ∇F(s_n)‖ / ‖s_{n+1} − s_n‖`` along consecutive points (lower bounds on M);
    pairs closer than ``min_step`` are skipped."""
    out = []
    for a, b, ga, gb in zip(points[:-1], points[1:], grads[:-1], grads[1:]):
        ds = float((b - a).norm())
        if ds > min_step:
            out.append(float((gb - ga).norm()) / ds)
    return out


# ------------------------------------------------------------------------------------------------
# Assumption 6.1: χ² = sup_{s ∈ S} E[e(s, s̄)²],  e(s, s̄) = (∇F(s̄) − G̃(s̄))ᵀ(s − s̄)
# ------------------------------------------------------------------------------------------------
@dataclass
class ChiInfo:
    chi2: float                 # max over vertices of the mean of e²
    bias2: float                # the same quantity with the mean error only (systematic part)
    var: float                  # chi2 − bias2 at the maximising vertex (stochastic part)
    argmax_vertex: int
    n_samples: int


def chi_squared(true_grad: torch.Tensor, estimates: Sequence[torch.Tensor], s_bar: torch.Tensor,
                vertices: torch.Tensor) -> ChiInfo:
    """``χ² = sup_{s∈S} E[((∇F(s̄) − G̃)ᵀ(s − s̄))²]`` from samples of ``G̃(s̄)``.

    ``E[(dᵀw)²]`` is a convex quadratic in ``s`` (w = s − s̄), so its supremum over the polytope S is
    attained at a vertex: the maximum over the rows of ``vertices`` is exact (up to sampling).
    """
    D = torch.stack([(true_grad - e).reshape(-1) for e in estimates]).double()   # (N, r)
    W = (vertices.double() - s_bar.reshape(1, -1).double())                       # (V, r)
    E = D @ W.T                                                                   # (N, V)
    per_vertex = (E ** 2).mean(0)
    bias_vertex = (E.mean(0)) ** 2
    j = int(per_vertex.argmax())
    return ChiInfo(float(per_vertex[j]), float(bias_vertex.max()), float(per_vertex[j] - bias_vertex[j]),
                   j, len(estimates))


# ------------------------------------------------------------------------------------------------
# Frank-Wolfe quantities on the floored simplex S = {s ≥ ε, Σ s ≤ τ + rε}
# ------------------------------------------------------------------------------------------------
def floored_simplex_vertices(r: int, tau: float, eps: float, dtype=torch.float64) -> torch.Tensor:
    """Rows: ``v_0 = ε·1`` and ``v_i = ε·1 + τ e_i``."""
    V = torch.full((r + 1, r), eps, dtype=dtype)
    V[1:] += tau * torch.eye(r, dtype=dtype)
    return V


def product_vertices_gap(g: torch.Tensor, s: torch.Tensor, blocks: Sequence[int], tau, eps) -> float:
    """FW gap ``max_{v ∈ S} gᵀ(s − v)`` on a product of floored simplices (one per block)."""
    taus = tau if isinstance(tau, (list, tuple)) else [tau] * len(blocks)
    gap, i = 0.0, 0
    for r, t in zip(blocks, taus):
        gb, sb = g[i:i + r].double(), s[i:i + r].double()
        V = floored_simplex_vertices(r, t, eps)
        gap += float((gb @ sb) - (V @ gb).min())
        i += r
    return gap


def diameter_floored_simplex(r: int, tau: float) -> float:
    """Δ = max distance between vertices: τ√2 for r ≥ 2 (between v_i, v_j), τ for r = 1."""
    return tau * math.sqrt(2.0) if r >= 2 else tau


@dataclass
class SlopeFit:
    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    n_points: int


def loglog_slope(T: Sequence[float], values: Sequence[float], conf: float = 0.95) -> SlopeFit:
    """OLS fit ``log v = a + b log T`` with a Student-t confidence interval on the slope b.

    (Points of a running minimum are serially dependent; the interval is a descriptive OLS interval,
    not an exact one.)"""
    from scipy import stats
    x = np.log(np.asarray(T, dtype=float))
    yv = np.log(np.maximum(np.asarray(values, dtype=float), 1e-300))
    n = len(x)
    if n < 3:
        raise ValueError(f"need at least 3 points for a slope with a confidence interval, got {n}")
    if np.ptp(yv) == 0.0:      # exactly flat: slope 0 with a degenerate (zero-width) interval
        return SlopeFit(0.0, float(yv[0]), 0.0, 0.0, n)
    res = stats.linregress(x, yv)
    t = stats.t.ppf(0.5 + conf / 2, n - 2)
    se = float(res.stderr) if np.isfinite(res.stderr) else 0.0
    return SlopeFit(float(res.slope), float(res.intercept), float(res.slope - t * se),
                    float(res.slope + t * se), n)


def support(s: torch.Tensor, eps: float, rel_tol: float = 1e-3, tau: float = 1.0) -> torch.Tensor:
    """Boolean mask of the components above the floor: ``s_i > ε + rel_tol·τ``."""
    return s.reshape(-1) > eps + rel_tol * tau


def identification_iteration(history: Sequence[torch.Tensor]) -> Optional[int]:
    """First index n such that the support mask is the same for all iterates from n on.
    ``None`` for an empty history."""
    if not history:
        return None
    last = history[-1]
    n = len(history) - 1
    while n > 0 and torch.equal(history[n - 1], last):
        n -= 1
    return n


@dataclass
class ComplementarityInfo:
    lambda_min: float             # min over vertices outside the minimal face of ∇F(s*)ᵀ(v − s*)
    face: List[int]               # vertex indices (0 = v_0, i = v_i) of the minimal face
    outside: List[int]
    exposed_equals_minimal: bool  # every vertex with λ_v ≈ 0 lies in the minimal face
    lambdas: List[float]


def strict_complementarity(grad: torch.Tensor, s_star: torch.Tensor, tau: float, eps: float,
                           rel_tol: float = 1e-3, zero_tol: float = 1e-8) -> ComplementarityInfo:
    """``λ_v(s*) = ∇F(s*)ᵀ(v − s*)`` over the vertices of one floored simplex.

    The minimal face of s* is spanned by ``v_i`` for the components above the floor and by ``v_0``
    when the budget is not tight (``Σ(s−ε) < τ(1 − rel_tol)``). Strict complementarity: ``λ_v > 0``
    for every vertex outside it; the exposed face (vertices with ``λ_v ≤ zero_tol``) must equal it.
    """
    r = s_star.numel()
    V = floored_simplex_vertices(r, tau, eps)
    g, s = grad.reshape(-1).double(), s_star.reshape(-1).double()
    lam = (V - s) @ g
    sup = support(s, eps, rel_tol, tau)
    face = [i + 1 for i in range(r) if bool(sup[i])]
    if float((s - eps).sum()) < tau * (1 - rel_tol):
        face = [0] + face
    outside = [j for j in range(r + 1) if j not in face]
    lmin = float(lam[outside].min()) if outside else math.inf
    scale = max(float(g.abs().max()) * tau, 1e-300)
    exposed = [j for j in range(r + 1) if float(lam[j]) <= zero_tol * scale + 1e-300]
    return ComplementarityInfo(lmin, face, outside, set(exposed) <= set(face) or not outside,
                               [float(v) for v in lam])
