"""Lower-level solves and reference hypergradients for the checks.

* :func:`converge_lower` — L-BFGS to a gradient tolerance, then (small y) Newton polishing with the
  dense Hessian: the "converged lower level" B*(s).
* :func:`lower_steps` — T_max AdamW steps on D2 mini-batches, warm-started (Algorithm 1's regime),
  with the manifold retraction after each step.
* :func:`reference_hypergradient` — ``exact`` (dense) or converged ``cg`` at B*(s).
* :func:`fd_hypergradient` — central differences of F(s) = f1(B*(s), s) with the lower level re-solved
  by Newton from B*(s): verifies the reference on small problems.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torchopt
from torch.func import grad

import bilevel
from bilevel import linear_solvers as ls
from bilevel import pytree as pt
from bilevel.problem import math_attention

from .problems.base import AdapterProblem


@dataclass
class LowerResult:
    y: dict
    grad_norm: float
    iterations: int
    newton_steps: int = 0
    pd: bool = False          # ∂²_yy g ≻ 0 at the returned point (checked on the Newton path only)


def dense_lower_hessian(ap: AdapterProblem, x, y, batch) -> torch.Tensor:
    """∂²_yy g as a dense matrix (vectorised forward-over-reverse; small y only)."""
    like = pt.detach(y)
    xd = pt.detach(x)

    def g_flat(v):
        return ap.lower_loss(xd, pt.unflatten(v, like), batch)

    try:
        with math_attention():          # SDPA's fused kernels have no forward-mode rules
            H = torch.func.hessian(g_flat)(pt.flatten(like))
    except Exception:  # ops without forward-mode / batching rules
        ops = ap.problem.operators(x, y, batch)
        H = ls.dense_matrix(ops.hvp, like)
    return 0.5 * (H + H.T)


def lower_grad_norm(ap: AdapterProblem, x, y, batch) -> float:
    return float(pt.norm(grad(ap.lower_loss, argnums=1)(pt.detach(x), pt.detach(y), batch)))


def converge_lower(ap: AdapterProblem, x, y0, batch=None, gtol: float = 1e-9, max_iter: int = 500,
                   newton: Optional[bool] = None, newton_steps: int = 8) -> LowerResult:
    """Minimise g(s, ·) on the full D2 batch from ``y0`` (warm start); ``max_iter=0``: Newton only."""
    batch = ap.D2 if batch is None else batch
    x = pt.detach(x)
    like = pt.detach(y0)
    if max_iter == 0:
        return _newton(ap, x, like, batch, newton_steps, 0)
    n = pt.numel(like)
    if (newton is None or newton) and n <= 3000:
        # warm start: pure Newton first; accepted only at a local minimum (tiny gradient, H ≻ 0)
        res = _newton(ap, x, like, batch, 6, 0)
        if res.grad_norm <= 1e-10 and res.pd:
            return res
    flat = pt.flatten(like).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([flat], lr=1.0, max_iter=max_iter, tolerance_grad=gtol,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        val = ap.lower_loss(x, pt.unflatten(flat, like), batch)
        val.backward()
        return val

    opt.step(closure)
    y = ap.retract_y(pt.unflatten(flat.detach(), like))
    iters = opt.state[opt._params[0]].get("n_iter", 0)
    if newton is None:
        newton = n <= 3000
    if newton:
        return _newton(ap, x, y, batch, newton_steps, int(iters))
    return LowerResult(y, lower_grad_norm(ap, x, y, batch), int(iters), 0)


def _newton(ap, x, y, batch, newton_steps, iters):
    """Damped Newton steps with the dense Hessian (backtracking on ‖∂_y g‖)."""
    k = 0
    pd = False
    if True:
        gnorm = lower_grad_norm(ap, x, y, batch)
        for k in range(1, newton_steps + 1):
            if gnorm < 1e-13:
                k -= 1
                break
            H = dense_lower_hessian(ap, x, y, batch)
            pd = bool(torch.linalg.eigvalsh(H)[0] > 0)
            gy = pt.flatten(grad(ap.lower_loss, argnums=1)(x, y, batch))
            step = torch.linalg.solve(H, gy)
            t = 1.0
            for _ in range(20):
                y_new = pt.unflatten(pt.flatten(y) - t * step, y)
                gn = lower_grad_norm(ap, x, y_new, batch)
                if gn < gnorm:
                    break
                t *= 0.5
            else:
                break
            y, gnorm = ap.retract_y(y_new), gn
    if gnorm < 1e-13 or not pd:
        pd = bool(torch.linalg.eigvalsh(dense_lower_hessian(ap, x, y, batch))[0] > 0)
    return LowerResult(y, lower_grad_norm(ap, x, y, batch), int(iters), k, pd)


def newton_cg_polish(ap: AdapterProblem, x, y, batch=None, steps: int = 4, cg_iter: int = 200,
                     gtol: float = 1e-12) -> LowerResult:
    """Inexact Newton steps on g(s, ·) with the Hessian applied by HVPs (CG to a relative residual
    min(0.1, √‖∂_y g‖)), a backtracking line search on ‖∂_y g‖ and the retraction: polishes an
    L-BFGS point of a large lower level (where dense Newton is unaffordable) near a strict minimum."""
    batch = ap.D2 if batch is None else batch
    x = pt.detach(x)
    y = pt.detach(y)
    gfun = grad(ap.lower_loss, argnums=1)
    gnorm = lower_grad_norm(ap, x, y, batch)
    k = 0
    for k in range(1, steps + 1):
        if gnorm <= gtol:
            k -= 1
            break
        ops = ap.problem.operators(x, y, batch)
        b = pt.flatten(gfun(x, y, batch))

        def mv(v):
            return pt.flatten(ops.hvp(pt.unflatten(v, y)))

        d = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = float(r @ r)
        tol = min(0.1, math.sqrt(gnorm)) * math.sqrt(rs)
        for _ in range(cg_iter):
            Ap = mv(p)
            pAp = float(p @ Ap)
            if pAp <= 0:
                break
            a = rs / pAp
            d = d + a * p
            r = r - a * Ap
            rs_new = float(r @ r)
            if math.sqrt(rs_new) <= tol:
                break
            p = r + (rs_new / rs) * p
            rs = rs_new
        if not bool(d.abs().sum() > 0):
            break
        t = 1.0
        for _ in range(20):
            y_new = ap.retract_y(pt.unflatten(pt.flatten(y) - t * d, y))
            gn = lower_grad_norm(ap, x, y_new, batch)
            if gn < gnorm:
                break
            t *= 0.5
        else:
            break
        y, gnorm = y_new, gn
    return LowerResult(y, gnorm, 0, k)


def lower_steps(ap: AdapterProblem, x, y, steps: int, stream, lr: float = 1e-2, state=None,
                weight_decay: float = 0.0):
    """``steps`` Adam(W) steps on mini-batches from ``stream`` (the algorithm's lower level).

    The damping λ is already inside g; ``weight_decay`` adds AdamW's decoupled decay on top (0 by
    default so that the fixed point is B*(s) of the same g)."""
    opt = torchopt.adamw(lr, weight_decay=weight_decay) if weight_decay > 0 else torchopt.adam(lr)
    x = pt.detach(x)
    y = pt.detach(y)
    if state is None:
        state = opt.init(y)
    gfun = grad(ap.lower_loss, argnums=1)
    for _ in range(steps):
        gy = gfun(x, y, next(stream))
        updates, state = opt.update(gy, state, params=y, inplace=False)
        y = ap.retract_y(torchopt.apply_updates(y, updates, inplace=False))
    return y, state


def reference_hypergradient(ap: AdapterProblem, x, y_star, method: str = "auto", cg_tol: float = 1e-10,
                            cg_maxiter: int = 2000):
    """∇F(s) at the converged lower level: dense ``exact`` (small y) or converged ``cg``."""
    n = pt.numel(y_star)
    if method == "auto":
        method = "exact" if n <= 3000 else "cg"
    if method == "exact":
        est = bilevel.estimators.get("exact", max_dim=4000)
    else:
        est = bilevel.estimators.get("cg", tol=cg_tol, maxiter=cg_maxiter)
    res = est(ap.problem, pt.detach(x), pt.detach(y_star), ap.D1, ap.D2)
    return res.grad["s"].detach(), res.info, method


def upper_value(ap: AdapterProblem, x, y) -> float:
    return float(ap.upper_loss(pt.detach(x), pt.detach(y), ap.D1))


def fd_hypergradient(ap: AdapterProblem, x, y_star, h: float = 1e-5):
    """Central differences ``(F(s + h e_i) − F(s − h e_i)) / 2h`` with B*(s ± h e_i) re-solved."""
    s = x["s"].detach()
    out = torch.zeros_like(s)
    worst = 0.0
    for i in range(s.numel()):
        vals = []
        for sign in (1.0, -1.0):
            sp = s.clone()
            sp[i] += sign * h
            res = converge_lower(ap, {"s": sp}, y_star, max_iter=0, newton_steps=10)
            worst = max(worst, res.grad_norm)
            vals.append(upper_value(ap, {"s": sp}, res.y))
        out[i] = (vals[0] - vals[1]) / (2 * h)
    return out, worst


def lower_hessian_extremes(ap: AdapterProblem, x, y, batch=None, damped: bool = True):
    """(λ_min, λ_max) of ∂²_yy g at (s, y); ``damped=False`` removes the λ‖y‖²/2 damping
    (keeps the gauge penalty) to expose the scaling symmetry."""
    from .constants import DENSE_MAX, extreme_eigenvalue
    batch = ap.D2 if batch is None else batch
    wd = ap.weight_decay
    if not damped:
        ap.weight_decay = 0.0
    try:
        prob = bilevel.BilevelProblem(ap.upper_loss, ap.lower_loss)
        ops = prob.operators(pt.detach(x), pt.detach(y), batch)
        like = pt.detach(y)
        n = pt.numel(like)

        def mv(v):
            return pt.flatten(ops.hvp(pt.unflatten(v.to(ap.dtype), like))).to(v.dtype)

        if n <= DENSE_MAX:
            ev = torch.linalg.eigvalsh(dense_lower_hessian(ap, x, y, batch).double())
            return float(ev[0]), float(ev[-1]), True
        from .constants import lanczos_ritz
        ev = lanczos_ritz(mv, n, steps=40, dtype=ap.dtype, device=ap.device)
        # Ritz values: λ_max is accurate after a few dozen steps; λ_min(Ritz) is an upper bound
        return float(ev[0]), float(ev[-1]), False
    finally:
        ap.weight_decay = wd


def safe(v: float) -> float:
    return v if (isinstance(v, float) and math.isfinite(v)) else float(v)
