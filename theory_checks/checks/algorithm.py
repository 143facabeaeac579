"""Algorithm 1 as the paper runs it, instrumented: T_max Adam steps on D2 mini-batches (warm start),
the closed-form estimate on a D1 mini-batch, an away-step Frank-Wolfe step with the short step
(M measured at s0), no truncation (so that the support may change back), no stopping on the gap.
The reference ∇F(s_n) (lower level converged, warm-started) is computed at every iteration
(``ref_every``) or at log-spaced checkpoints."""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import solvers
from ..study import Study


def checkpoints(T: int, k: int):
    pts = np.unique(np.round(np.geomspace(1, T, k)).astype(int) - 1)
    return sorted(set(int(p) for p in pts) | {0, T - 1})


def run(st: Study):
    from bilevel import frank_wolfe as fw
    ap, cfg = st.ap, st.cfg
    t0 = time.perf_counter()
    reg = st.regime_points()
    S = fw.FlooredSimplex(ap.r_total, ap.tau, ap.eps)
    opt = fw.AwayStepFW(S, step=fw.ShortStep(lipschitz=st.M0))
    s = reg["s0"].clone()
    state = opt.init(s)
    y = reg["ref0"]["y"]
    lstate = None
    lower = ap.stream(ap.D2, cfg.lower_bs, cfg.seed + 11)
    upper = ap.stream(ap.D1, cfg.upper_bs, cfg.seed + 13)
    T = cfg.T_outer
    ref_at = set(range(T)) if cfg.ref_every else set(checkpoints(T, cfg.n_checkpoints))
    hist = {"s": [], "est_gap": [], "kind": [], "ref_points": []}
    y_ref = reg["ref0"]["y"]
    for n in range(T):
        y, lstate = solvers.lower_steps(ap, {"s": s}, y, cfg.T_max, lower, lr=cfg.lower_lr, state=lstate)
        if n in ref_at:
            ref = st.reference(s, y_ref)
            y_ref = ref["y"]
            hist["ref_points"].append({"n": n, "s": s.clone(), "grad": ref["grad"], "F": ref["F"],
                                       "gap": st.gap(ref["grad"], s)})
        g = ap.closed_form({"s": s}, y, next(upper))["s"]
        hist["s"].append(s.clone())
        s, state, info = opt.step(g.to(s.dtype), state)
        hist["est_gap"].append(float(info.gap))
        hist["kind"].append(int(info.kinds[0]))
    hist["s"].append(s.clone())
    hist["seconds"] = time.perf_counter() - t0
    st.run_record = hist
    st.timings["algorithm"] = hist["seconds"]
    st.log(f"  [{ap.name}] Algorithm 1: {T} outer iterations in {hist['seconds']:.1f}s, "
           f"{len(hist['ref_points'])} reference points")
    return hist
