"""Shared state of the checks on one problem instance: converged lower levels, reference
hypergradients (cached per s), the regime points, and Algorithm 1's run.

Result rows are plain dicts: ``check, problem, instance, quantity, value, verdict, criterion, data``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from bilevel import pytree as pt

from . import constants as C
from . import criteria as CR
from . import solvers
from .problems.base import AdapterProblem


@dataclass
class StudyConfig:
    T_outer: int = 120              # outer iterations of Algorithm 1
    T_max: int = 5                  # lower steps per outer iteration
    lower_lr: float = 2e-2          # Adam step of the lower level
    lower_bs: int = 32              # D2 mini-batch
    upper_bs: int = 32              # D1 mini-batch (the estimator's batch ξ)
    ref_every: Optional[int] = 1    # reference ∇F every n iterations (None: log-spaced checkpoints)
    n_checkpoints: int = 7
    chi_sizes: tuple = (8, 32, 128, 10**9)
    chi_samples: int = 32
    budgets: tuple = (1, 5, 20)     # HVP budgets of cg / neumann ("equal cost" = 1)
    fd_check: bool = True           # verify the reference by finite differences (small problems)
    lbfgs_iter: int = 500
    lbfgs_gtol: float = 1e-7
    cg_tol: float = 1e-9
    cg_maxiter: int = 1000
    regime_step: float = 0.1        # s1 = s0 + regime_step (v_1 − s0)
    seed: int = 0


def row(check, ap: AdapterProblem, quantity, value, verdict, criterion, **data) -> Dict[str, Any]:
    return {"check": check, "problem": ap.name.split("-")[0], "instance": ap.name,
            "quantity": quantity, "value": value, "verdict": verdict, "criterion": criterion,
            "data": data}


def fmt(v: float, p: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.{p}g}"


class Study:
    def __init__(self, ap: AdapterProblem, cfg: StudyConfig, log=print):
        self.ap, self.cfg, self.log = ap, cfg, log
        self.refs: Dict[bytes, dict] = {}
        self.rows: List[dict] = []
        self.plots: Dict[str, Any] = {"instance": ap.name}
        self.timings: Dict[str, float] = {}
        self._y_warm = ap.y_init

    # -- lower level / references ------------------------------------------------------------------
    def converge(self, s: torch.Tensor, y_warm=None) -> solvers.LowerResult:
        y0 = self._y_warm if y_warm is None else y_warm
        res = solvers.converge_lower(self.ap, {"s": s}, y0, gtol=self.cfg.lbfgs_gtol,
                                     max_iter=self.cfg.lbfgs_iter)
        return res

    def reference(self, s: torch.Tensor, y_warm=None, lower: Optional[solvers.LowerResult] = None) -> dict:
        """∇F(s) at B*(s): the lower level converged from ``y_warm`` (or ``lower``, already converged)."""
        key = s.detach().cpu().double().numpy().tobytes()
        if key in self.refs:
            return self.refs[key]
        t0 = time.perf_counter()
        low = self.converge(s, y_warm) if lower is None else lower
        g, info, method = solvers.reference_hypergradient(self.ap, {"s": s}, low.y, cg_tol=self.cfg.cg_tol,
                                                          cg_maxiter=self.cfg.cg_maxiter)
        F = solvers.upper_value(self.ap, {"s": s}, low.y)
        out = {"grad": g, "y": low.y, "F": F, "lower_grad_norm": low.grad_norm, "method": method,
               "residual": info.residual, "iterations": info.iterations,
               "seconds": time.perf_counter() - t0}
        self.refs[key] = out
        self._y_warm = low.y
        return out

    def vertices(self) -> torch.Tensor:
        return C.floored_simplex_vertices(self.ap.r_total, self.ap.tau, self.ap.eps, self.ap.dtype)

    def gap(self, g: torch.Tensor, s: torch.Tensor) -> float:
        return C.product_vertices_gap(g, s, [self.ap.r_total], self.ap.tau, self.ap.eps)

    def gap_blocks(self, g: torch.Tensor, s: torch.Tensor) -> float:
        """FW gap on the product of one floored simplex per layer (τ per layer)."""
        return C.product_vertices_gap(g, s, self.ap.blocks, self.ap.tau, self.ap.eps)

    def regime_points(self):
        """s0 with B*(s0), and s1 = s0 + step (v_1 − s0) with y_T = T_max Adam steps from B*(s0)."""
        if hasattr(self, "_regime"):
            return self._regime
        ap, cfg = self.ap, self.cfg
        s0 = ap.x0["s"]
        ref0 = self.reference(s0)
        V = self.vertices()
        s1 = s0 + cfg.regime_step * (V[1] - s0)
        stream = ap.stream(ap.D2, cfg.lower_bs, cfg.seed + 7)
        yT, _ = solvers.lower_steps(ap, {"s": s1}, ref0["y"], cfg.T_max, stream, lr=cfg.lower_lr)
        ref1 = self.reference(s1, ref0["y"])
        dist = float(pt.norm(pt.sub(yT, ref1["y"]))) / max(float(pt.norm(ref1["y"])), 1e-300)
        self._regime = {"s0": s0, "ref0": ref0, "s1": s1, "yT": yT, "ref1": ref1, "yT_rel_dist": dist}
        self.y_T_dist = dist
        return self._regime

    # -- estimator evaluations ---------------------------------------------------------------------
    def estimates(self, s, y, upper_batch, lower_batch, budgets=None, L=None) -> Dict[str, dict]:
        """Closed form (Euclidean / Riemannian), first-order, cg(k), neumann(k) at (s, y)."""
        import bilevel
        ap = self.ap
        x = {"s": s}
        out = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            g = fn()
            out[name] = {"grad": g.detach(), "seconds": time.perf_counter() - t0}

        timed("closed-form (euclidean)", lambda: ap.closed_form(x, y, upper_batch)["s"])
        if ap.basis != "euclidean":
            timed("closed-form (riemannian)", lambda: ap.closed_form(x, y, upper_batch, riemannian=True)["s"])
        fo = bilevel.estimators.get("first-order")
        timed("first-order", lambda: fo(ap.problem, x, y, upper_batch, lower_batch).grad["s"])
        for k in (budgets or self.cfg.budgets):
            cg = bilevel.estimators.get("cg", tol=0.0, maxiter=k)
            timed(f"cg({k} HVP)", lambda: cg(ap.problem, x, y, upper_batch, lower_batch).grad["s"])
            if L is not None and L > 0:
                nm = bilevel.estimators.get("neumann", eta=1.0 / L, terms=k + 1)
                timed(f"neumann({k} HVP)", lambda: nm(ap.problem, x, y, upper_batch, lower_batch).grad["s"])
        return out
