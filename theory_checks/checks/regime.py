"""Checks of the regime the bilevel training preset runs in (``PRESETS["bilevel"]``, ``debora/train/config.py``;
the default through round 11 — the round-12 default holds s and has no upper-level step to check):

oblique bases (unit-norm columns, s carries each component's magnitude), s started near the floor
(``init_s`` = ε + τ/(10(r0+1)) ≈ 0.012, ε = 1e-3), τ = 1 per layer (a product of floored simplices),
scaling α/r0 = 32/8, D1 = D2 (``split="same"``: the upper and lower losses are the same training
loss), the ``first-order`` estimator g = ∂_s f, away-step Frank-Wolfe with the constant step γ = 0.05,
T_max = 1 lower step (Adam, lr 5e-4 decayed by the trainer's ``lr_schedule``, batch 32; with
``fw_step_schedule="lr"`` γ follows the same factor) per outer iteration, and a count budget: from n0 = 10 %
of the run, the live components beyond k(n) (``debora.train.budget``: cubic from R0 to R* = 2 per
adapter between 10 % and 70 % of the run) with the smallest s are moved to the floor and leave.
:data:`PRESET` is read from the trainer's preset (:func:`default_preset`), not copied.

1. Envelope theorem. With f1 = f2 = f, at an exact lower solution (∂_B f = 0 on the manifold)
   ∇F(s) = ∂_s f(B*(s), s) − ∂²_sB f [∂²_BB f]⁻¹ ∂_B f = ∂_s f: ``first-order`` *is* the
   hypergradient. Measured: cosine / relative error against the reference ∇F (implicit, at a
   converged lower level, Riemannian stationarity by ``debora.manifolds.project``) at s = init_s·1,
   after one FW step and T_max warm-started lower steps, and along the run (the lower level as the
   trainer leaves it). The lower level carries weight decay λ on the head only (manifold bases: the
   gauge penalty, zero on the manifold), so "upper = task loss" (the trainer's f1) differs from
   "upper = lower" by ∂_B f1 = −λ·head; both are reported. Contrast: D1 ≠ D2 (random halves).
2. Assumption 6.1's χ for the first-order estimator on mini-batches (b = 32 of D) against the
   threshold η p̃/(2+2η) (η < 1/3 ⟺ χ < p̃/8).
3. Theorem 6.5's identification question: does the support the trainer keeps (the top-k of s,
   k = R*) stabilise? Overlap of the top-k set between successive iterations, the iteration from
   which it never changes, with and without the count budget, and the margin λ_min(s*) − 2χ.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Dict, List

import torch

import bilevel
from bilevel import pytree as pt
from debora.train.budget import scheduled_count, smallest_beyond
from debora.train.lr_schedule import lr_factor

from .. import constants as C
from .. import criteria as CR
from .. import solvers
from ..problems.base import AdapterProblem, cosine, rel_error
from ..study import Study, StudyConfig, fmt, row

NAME_ENV = "Envelope (D1=D2)"
NAME_CHI = "Assumption 6.1 [bilevel]"
NAME_ID = "Thm 6.5 [bilevel]"



def default_preset() -> Dict[str, object]:
    """The bilevel training preset (``PRESETS["bilevel"]``, ``debora/train/config.py``: Frank-Wolfe on s,
    the default through round 11; the round-12 default holds s and has no upper-level step to check),
    read from the trainer so that the two cannot drift apart; ``init_s`` is the value the adapters start at
    when the config leaves it to them (ε + τ/(10(r0+1)) per layer with oblique bases)."""
    from debora.train import TrainConfig
    d = TrainConfig.from_preset("bilevel")
    assert d.budget == "per_layer" and d.basis in ("oblique", "stiefel") and d.split == "same" \
        and d.estimator == "first-order" and d.fw == "away" and d.fw_step == "constant", \
        "the bilevel preset left the regime these checks model; update theory_checks/checks/regime.py"
    init_s = d.init_s if d.init_s is not None else d.eps + d.tau / (10 * (d.init_rank + 1))
    return dict(basis=d.basis, init_s=init_s, eps=d.eps, tau=d.tau, alpha=d.alpha, init_rank=d.init_rank,
                weight_decay=d.weight_decay, gamma=d.fw_step_size, T_max=d.inner_steps, lr=d.lr,
                lr_schedule=d.lr_schedule, warmup=d.warmup, fw_step_schedule=d.fw_step_schedule,
                batch=d.batch_size, target_rank=d.target_rank, prune_start=d.prune_start,
                prune_end=d.prune_end, prune_schedule=d.prune_schedule, truncate_from=d.truncate_from)


PRESET = default_preset()


def instances(problem: str, device: str = "cpu", quick: bool = False):
    """(factory, options) for the regime problems: the toy matrix layer and MiniLM-top."""
    P = PRESET
    common = dict(basis=P["basis"], eps=P["eps"], tau=P["tau"], weight_decay=P["weight_decay"],
                  s0=P["init_s"], scaling=P["alpha"] / P["init_rank"], split="same")
    if problem == "toy":
        from ..problems.toy import make_toy
        cfg = StudyConfig(lbfgs_iter=500, lbfgs_gtol=1e-10, cg_tol=1e-10, seed=0)
        return [(lambda: make_toy("matrix", rank=P["init_rank"], name="toy-matrix-default", **common),
                 cfg, dict(T_outer=120 if quick else 300, n_ref=4 if quick else 6, chi_samples=16 if quick else 32))]
    if problem == "minilm":
        from ..problems.minilm import make_minilm
        cfg = StudyConfig(lbfgs_iter=300, lbfgs_gtol=1e-7, cg_tol=1e-8, cg_maxiter=500, seed=0)
        return [(lambda: make_minilm(rank=P["init_rank"], device=device, name="minilm-default", **common),
                 cfg, dict(T_outer=100 if quick else 200, n_ref=3 if quick else 5, chi_samples=8 if quick else 16,
                           polish=4))]
    return []


# -- helpers ---------------------------------------------------------------------------------------
def product_vertices(blocks: List[int], tau: float, eps: float, dtype=torch.float64) -> torch.Tensor:
    """Every vertex of the product of floored simplices (one per block), as rows."""
    per = [C.floored_simplex_vertices(r, tau, eps, dtype) for r in blocks]
    rows = [torch.cat(combo) for combo in itertools.product(*[list(V) for V in per])]
    return torch.stack(rows)


def first_order(ap: AdapterProblem, s, y, batch) -> torch.Tensor:
    est = bilevel.estimators.get("first-order")
    return est(ap.problem, {"s": s}, pt.detach(y), batch, batch).grad["s"].detach()


def riemannian_residual(ap: AdapterProblem, s, y) -> float:
    return float(pt.norm(ap.riemannian_lower_grad({"s": s}, y, ap.D2)))


def top_k(s: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[torch.argsort(s, descending=True, stable=True)[:k]] = True
    return mask


def blocks_slices(ap: AdapterProblem):
    out, i = [], 0
    for r in ap.blocks:
        out.append(slice(i, i + r))
        i += r
    return out


def reference_upper_lower(st: Study, s, y_warm=None, lower=None):
    """The reference ∇F for f1 = task loss, and for f1 = g (upper = lower), at the same B*(s)."""
    ap = st.ap
    ref = st.reference(s, y_warm, lower=lower)
    ap.upper_damped = True
    try:
        g_same, _, _ = solvers.reference_hypergradient(ap, {"s": s}, ref["y"], cg_tol=st.cfg.cg_tol,
                                                       cg_maxiter=st.cfg.cg_maxiter)
    finally:
        ap.upper_damped = False
    return ref, g_same


def envelope_verdict(cos: float, rel: float, resid: float) -> str:
    if not (math.isfinite(cos) and math.isfinite(rel)):
        return CR.INCONCLUSIVE
    if resid > CR.ENVELOPE_LOWER_TOL:
        return CR.INCONCLUSIVE
    return CR.HOLDS if (cos >= CR.ENVELOPE_COS and rel <= CR.ENVELOPE_REL) else CR.FAILS


ENVELOPE_TEXT = (f"holds if cos ≥ {CR.ENVELOPE_COS} and rel.err ≤ {CR.ENVELOPE_REL:g} at a lower level "
                 f"with Riemannian ‖∂_B g‖ ≤ {CR.ENVELOPE_LOWER_TOL:g} (debora.manifolds.project); "
                 "inconclusive if the lower level is less converged; fails otherwise")


# -- the checks ------------------------------------------------------------------------------------
def envelope(st: Study, opts) -> dict:
    ap, P = st.ap, PRESET
    s_a = ap.x0["s"]
    y_warm = None
    if opts.get("polish"):   # large lower level: L-BFGS, then inexact Newton (HVP + CG) to converge B*
        low = st.converge(s_a, ap.y_init)
        low = solvers.newton_cg_polish(ap, {"s": s_a}, low.y, steps=opts["polish"])
        ref_a, gsame_a = reference_upper_lower(st, s_a, lower=low)
    else:
        ref_a, gsame_a = reference_upper_lower(st, s_a)
    res_a = riemannian_residual(ap, s_a, ref_a["y"])
    fo_a = first_order(ap, s_a, ref_a["y"], ap.D1)
    st.log(f"  [{ap.name}] B*(init_s): Riemannian ‖∂_B g‖ = {res_a:.2e}; reference in {ref_a['seconds']:.1f}s")
    out = {"s_a": s_a, "ref_a": ref_a, "fo_a": fo_a, "gsame_a": gsame_a}
    # the lower level at B*(s0): ∂²_BB g invertible (the reference exists), how alike the components
    # are (max over pairs i ≠ j of |⟨⊗_k u_i^(k), ⊗_k u_j^(k)⟩|, unit columns: 1 = identical up to sign)
    # and how different the entries of ∇F are (what ranks the components)
    lo, hi, dense = solvers.lower_hessian_extremes(ap, {"s": s_a}, ref_a["y"])
    facs = ap.factors(ref_a["y"])
    coherence = {}
    for l in ap.layers:
        G = torch.ones(l.rank, l.rank, dtype=torch.float64)
        for F_ in facs[l.name]:
            F_ = F_.double()
            G = G * (F_.T @ F_).abs() / torch.outer(F_.norm(dim=0), F_.norm(dim=0))
        coherence[l.name] = float((G - torch.diag(torch.diag(G))).max())
    spread = {l.name: float((v.max() - v.min()) / v.abs().mean().clamp_min(1e-300))
              for l, v in zip(ap.layers, torch.split(gsame_a.double(), ap.blocks))}
    st.rows.append(row(NAME_ENV, ap, "B*(s0): λ_min, λ_max of ∂²_BB g; component coherence; spread of ∇F entries",
                       f"λ {fmt(lo)}, {fmt(hi)}{'' if dense else ' (Lanczos Ritz)'}; max pairwise |cos| of components "
                       + ", ".join(f"{k} {v:.4f}" for k, v in coherence.items()) + "; (max−min)/|mean| of ∇F "
                       + ", ".join(f"{k} {fmt(v)}" for k, v in spread.items()),
                       CR.HOLDS if (lo > 1e-8 * hi and dense) else (CR.FAILS if dense else CR.INCONCLUSIVE),
                       "holds if λ_min > 1e-8·λ_max (dense: the implicit reference exists); inconclusive for large "
                       "y, where λ_min is a 40-step Lanczos Ritz value (an upper bound); coherence and spread are "
                       "informational (coherence 1 and spread 0: all components alike, ∇F does not rank them)",
                       lam_min=lo, lam_max=hi, dense=dense, coherence=coherence, spread=spread))
    for label, ref_g in (("upper = lower (f1 = g)", gsame_a), ("upper = task loss (trainer's f1)", ref_a["grad"])):
        c, r = cosine(fo_a, ref_g), rel_error(fo_a, ref_g)
        verdict = envelope_verdict(c, r, res_a) if label.startswith("upper = lower") else CR.accuracy_verdict(c, r)
        crit = ENVELOPE_TEXT if label.startswith("upper = lower") else (
            "the envelope identity needs ∂_B f1 = 0, here ∂_B f1 = −λ·head ≠ 0 (weight decay on the head "
            "in the lower level only); " + CR.ACCURACY_TEXT)
        st.rows.append(row(NAME_ENV, ap, f"first-order vs ∇F at B*(s0), s0 = init_s·1, {label}",
                           f"cos {c:.10f}, rel.err {fmt(r)}; ‖∂_B g‖_Riem {fmt(res_a)}; ‖∇F‖ {fmt(float(ref_g.norm()))}",
                           verdict, crit, cos=c, rel=r, lower_residual=res_a, ref_norm=float(ref_g.norm()),
                           implicit_term_norm=float((fo_a - ref_g).norm())))
    # one FW step (γ) on the first-order direction, T_max warm-started lower steps from B*(s_a)
    S = _fw_set(ap)
    opt = bilevel.frank_wolfe.AwayStepFW(S, step=bilevel.frank_wolfe.Constant(P["gamma"]))
    s_b, _, _ = opt.step(fo_a.to(s_a.dtype), opt.init(s_a))
    stream = ap.stream(ap.D2, P["batch"], 17)
    yT, _ = solvers.lower_steps(ap, {"s": s_b}, ref_a["y"], P["T_max"], stream, lr=P["lr"])
    ref_b, gsame_b = reference_upper_lower(st, s_b, ref_a["y"])
    dist = float(pt.norm(pt.sub(ap.retracted(yT), ref_b["y"]))) / max(float(pt.norm(ref_b["y"])), 1e-300)
    fo_b = first_order(ap, s_b, yT, ap.D1)
    for label, ref_g in (("upper = lower", gsame_b), ("upper = task loss", ref_b["grad"])):
        c, r = cosine(fo_b, ref_g), rel_error(fo_b, ref_g)
        st.rows.append(row(NAME_ENV, ap, f"first-order at y_T (T_max={P['T_max']} Adam step, warm) vs ∇F(s1), "
                           f"s1 = one FW step γ={P['gamma']}, {label}",
                           f"cos {fmt(c, 6)}, rel.err {fmt(r)}; ‖y_T − B*(s1)‖/‖B*‖ {fmt(dist)}",
                           CR.accuracy_verdict(c, r), CR.ACCURACY_TEXT, cos=c, rel=r, yT_rel_dist=dist))
    out.update(s_b=s_b, ref_b=ref_b, yT=yT, fo_b=fo_b, gsame_b=gsame_b)
    return out


def halves_contrast(st_h: Study, s) -> dict:
    """D1 ≠ D2: first-order (∂_s f1 on D1 at B*(s) of D2) against ∇F."""
    ap = st_h.ap
    ref = st_h.reference(s)
    fo = first_order(ap, s, ref["y"], ap.D1)
    c, r = cosine(fo, ref["grad"]), rel_error(fo, ref["grad"])
    st_h.rows.append(row(NAME_ENV, ap, "contrast D1 ≠ D2 (random halves): first-order vs ∇F at B*(s0)",
                         f"cos {fmt(c, 6)}, rel.err {fmt(r)}; ‖∂_B g‖_Riem {fmt(riemannian_residual(ap, s, ref['y']))}",
                         CR.accuracy_verdict(c, r), CR.ACCURACY_TEXT, cos=c, rel=r))
    return {"cos": c, "rel": r}


def _fw_set(ap: AdapterProblem):
    from bilevel import frank_wolfe as fw
    return fw.ProductSet([fw.FlooredSimplex(r, ap.tau, ap.eps) for r in ap.blocks])


def fw_run(st: Study, T: int, n_ref: int, budget: bool, seed: int = 0) -> dict:
    """The trainer's loop in this regime: from the problem's initial bases (not B*), per outer
    iteration one Adam step on a batch of D, g = ∂_s f on that batch at the pre-step bases (the
    fused first-order of the trainer), an away-step FW step with γ, then (``budget``) the count
    schedule. Removed components stay at ε and out of the LMO (the trainer deletes them)."""
    from bilevel import frank_wolfe as fw
    ap, P = st.ap, PRESET
    t0 = time.perf_counter()
    S = _fw_set(ap)
    opt = fw.AwayStepFW(S, step=fw.Constant(P["gamma"]))
    s = ap.x0["s"].clone()
    state = opt.init(s)
    y = ap.y_init
    lstate = None
    stream = ap.stream(ap.D2, P["batch"], seed + 11)
    R0 = ap.r_total
    k_target = max(1, int(round(P["target_rank"] * len(ap.blocks))))
    n0 = int(P["truncate_from"] * T)
    alive = torch.ones(R0, dtype=torch.bool)
    slices = blocks_slices(ap)
    ref_at = set(int(v) for v in torch.linspace(0, T - 1, n_ref).round().tolist())
    hist = {"s": [], "gap_est": [], "ref": [], "alive": []}
    steps_total = T * P["T_max"]
    for n in range(T):
        # the trainer's lower lr schedule (lr_factor of each lower step) and, with fw_step_schedule="lr",
        # its FW step γ × the factor of the iteration's last lower step (debora/train/loop.py)
        lr_n = [P["lr"] * lr_factor(P["lr_schedule"], n * P["T_max"] + t, steps_total, P["warmup"])
                for t in range(P["T_max"])]
        if P["fw_step_schedule"] == "lr":
            opt.rule.gamma = P["gamma"] * lr_n[-1] / P["lr"]
        batch = next(stream)
        g = first_order(ap, s, y, batch)
        if n in ref_at:
            ref = st.reference(s, y)        # B*(s_n) of the basin the trainer's bases are in
            fo_full = first_order(ap, s, y, ap.D1)
            dist = float(pt.norm(pt.sub(ap.retracted(y), ref["y"]))) / max(float(pt.norm(ref["y"])), 1e-300)
            hist["ref"].append({"n": n, "s": s.clone(), "grad": ref["grad"], "y": y, "fo_full": fo_full,
                                "fo_batch": g, "dist": dist, "gap": st.gap_blocks(ref["grad"], s)})
        for lr_t in lr_n:       # Adam's moments carry over; only the step size follows the schedule
            y, lstate = solvers.lower_steps(ap, {"s": s}, y, 1, iter([batch]), lr=lr_t, state=lstate)
        g = torch.where(alive, g, g[alive].abs().max() + 1.0)     # removed: never the FW vertex
        s, state, info = opt.step(g.to(s.dtype), state)
        if budget and n >= n0:
            k = scheduled_count(n, T, R0, k_target, P["prune_start"], P["prune_end"], P["prune_schedule"])
            protected = torch.zeros(R0, dtype=torch.bool)
            for sl in slices:
                blk = torch.where(alive[sl], s[sl], torch.full_like(s[sl], -math.inf))
                protected[sl.start + int(torch.argmax(blk))] = True
            force = smallest_beyond(s, alive, k, protected)
            if bool(force.any()):
                alive &= ~force
                s = torch.where(force, torch.full_like(s, ap.eps), s)
                state = opt.init(s)
        hist["s"].append(s.clone())
        hist["alive"].append(alive.clone())
        hist["gap_est"].append(float(info.gap))
    hist.update(seconds=time.perf_counter() - t0, k=k_target, n0=n0,
                n_start=P["prune_start"] * T, n_end=P["prune_end"] * T, y=y, T=T)
    return hist


def topk_stats(hist: dict, k: int) -> dict:
    """Top-k of s among the live components (removed ones are deleted by the trainer)."""
    alive = hist.get("alive") or [torch.ones(s.numel(), dtype=torch.bool) for s in hist["s"]]
    masks = [top_k(torch.where(a, s, torch.full_like(s, -math.inf)), k) for s, a in zip(hist["s"], alive)]
    overlap = [float((a & b).sum()) / k for a, b in zip(masks[:-1], masks[1:])]
    changes = sum(o < 1.0 for o in overlap)
    n_id = C.identification_iteration(masks)
    final = masks[-1]
    to_final = [float((m & final).sum()) / k for m in masks]
    return {"overlap": overlap, "changes": changes, "n_id": n_id, "to_final": to_final,
            "final": final.nonzero().flatten().tolist()}


def run(st: Study, st_h: Study, opts: dict) -> None:
    ap, P = st.ap, PRESET
    t0 = time.perf_counter()
    env = envelope(st, opts)
    st.timings["envelope"] = time.perf_counter() - t0
    halves_contrast(st_h, ap.x0["s"])
    st.rows.extend(st_h.rows)
    st_h.rows = []
    st.timings["halves"] = time.perf_counter() - t0 - st.timings["envelope"]

    # the trainer's loop, with and without the count budget
    T = opts["T_outer"]
    runs = {}
    for budget in (True, False):
        t1 = time.perf_counter()
        runs[budget] = fw_run(st, T, opts["n_ref"], budget)
        st.log(f"  [{ap.name}] FW run ({'count budget' if budget else 'no budget'}): {T} iterations in "
               f"{time.perf_counter() - t1:.1f}s")
    h = runs[True]
    # first-order against ∇F along the run (the lower level as the trainer leaves it)
    along = []
    for p in h["ref"]:
        along.append({"n": p["n"], "cos": cosine(p["fo_full"], p["grad"]), "rel": rel_error(p["fo_full"], p["grad"]),
                      "cos_batch": cosine(p["fo_batch"], p["grad"]), "dist": p["dist"]})
    worst = min(along, key=lambda a: a["cos"])
    st.rows.append(row(NAME_ENV, ap, "first-order (full D) vs ∇F along the run (count budget; y as the trainer "
                       "leaves it, T_max=1)",
                       "; ".join(f"n={a['n']}: cos {fmt(a['cos'])}, rel {fmt(a['rel'])}, ‖y−B*‖/‖B*‖ {fmt(a['dist'])}"
                                 for a in along),
                       CR.accuracy_verdict(worst["cos"], worst["rel"]),
                       "verdict on the worst checkpoint: " + CR.ACCURACY_TEXT, points=along))

    # χ of the first-order estimator on mini-batches of D, against ∇F of f1 = g (the D1 = D2 problem,
    # verdict) and of f1 = task loss
    V = product_vertices(ap.blocks, ap.tau, ap.eps, ap.dtype)
    st.p_tilde = CR.P_TILDE_REL * st.gap_blocks(env["gsame_a"], env["s_a"])
    thr = st.p_tilde / 8.0
    last = h["ref"][-1]
    _, gsame_last = reference_upper_lower(st, last["s"], last["y"])
    chis = {}
    for label, s, y, refs in (("B*(s0)", env["s_a"], env["ref_a"]["y"], (env["gsame_a"], env["ref_a"]["grad"])),
                              ("y_T at s1", env["s_b"], env["yT"], (env["gsame_b"], env["ref_b"]["grad"])),
                              (f"run n={last['n']}", last["s"], last["y"], (gsame_last, last["grad"]))):
        batches = ap.minibatches(ap.D1, P["batch"], opts["chi_samples"], 101)
        ests = [first_order(ap, s, y, b) for b in batches]
        full = [first_order(ap, s, y, ap.D1)]
        vals = []
        for refg in refs:
            ci = C.chi_squared(refg, ests, s, V)
            vals.append({"chi": math.sqrt(ci.chi2), "bias": math.sqrt(ci.bias2),
                         "full_batch_chi": math.sqrt(C.chi_squared(refg, full, s, V).chi2)})
        chis[label] = {"upper=lower": vals[0], "task": vals[1]}
    chi = max(v["upper=lower"]["chi"] for v in chis.values())
    st.chi = chi
    st.rows.append(row(NAME_CHI, ap, f"χ of first-order (b={P['batch']}, D1 = D2) vs ηp̃/(2+2η) (η<1/3: p̃/8)",
                       "; ".join(f"{k}: χ {fmt(v['upper=lower']['chi'])} (full batch {fmt(v['upper=lower']['full_batch_chi'])}; "
                                 f"vs task-loss ∇F {fmt(v['task']['chi'])} / {fmt(v['task']['full_batch_chi'])})"
                                 for k, v in chis.items()) + f"; p̃/8 {fmt(thr)}",
                       CR.HOLDS if chi < thr else CR.FAILS,
                       f"holds if max χ (against ∇F of f1 = g) < p̃/8; p̃ = {CR.P_TILDE_REL:g}·gap(s0) = "
                       f"{st.p_tilde:.3g} (the trainer runs with p̃ = gap_tol = 0, where no χ > 0 qualifies)",
                       chi=chi, p_tilde=st.p_tilde, points=chis))

    # support identification: top-k (k = R*) of s, with and without the budget
    k = h["k"]
    for budget, hh in runs.items():
        ts = topk_stats(hh, k)
        Tn = len(hh["s"])
        if budget:
            n_end = hh["n_end"]
            spare = n_end - CR.TOPK_WINDOW_SPARE * (n_end - hh["n_start"])
            win = [o for i, o in enumerate(ts["overlap"]) if hh["n_start"] <= i + 1 <= n_end]
            mean_win = sum(win) / max(len(win), 1)
            verdict = CR.HOLDS if (ts["n_id"] is not None and ts["n_id"] <= spare) else CR.FAILS
            crit = (f"holds if the top-{k} set of s is fixed from an iteration ≤ n_end − "
                    f"{CR.TOPK_WINDOW_SPARE:g}·(n_end − n_start) = {spare:.0f} (s chose the survivors before the "
                    "schedule forced the count); fails otherwise")
            val = (f"top-{k} fixed from n={ts['n_id']} (prune window {hh['n_start']:.0f}–{n_end:.0f} of {Tn}); "
                   f"{ts['changes']} changes; mean successive overlap in the window {mean_win:.3f}; overlap with the "
                   f"final set at n0={hh['n0']}: {ts['to_final'][hh['n0']]:.2f}, at n_start: "
                   f"{ts['to_final'][int(hh['n_start'])]:.2f}; survivors {ts['final']}")
        else:
            stable = ts["n_id"] is not None and ts["n_id"] <= (1 - CR.THM65_STABLE_FRACTION) * Tn
            last_ref = hh["ref"][-1]
            margins = []
            for sl in blocks_slices(ap):
                ci = C.strict_complementarity(last_ref["grad"][sl], last_ref["s"][sl], ap.tau, ap.eps)
                margins.append(ci.lambda_min)
            lam = min(margins)
            margin = lam - 2 * chi
            verdict = (CR.HOLDS if stable else CR.FAILS) if margin > 0 else CR.INCONCLUSIVE
            crit = (f"as Thm 6.5: premise margin λ_min(s*) − 2χ > 0 (min over blocks, ∇F at the last checkpoint); "
                    f"then holds if the top-{k} set is unchanged over the last {CR.THM65_STABLE_FRACTION:.0%} of the run")
            mean_last = sum(ts["overlap"][Tn // 2:]) / max(len(ts["overlap"][Tn // 2:]), 1)
            val = (f"no budget: top-{k} fixed from n={ts['n_id']} of {Tn}; {ts['changes']} changes; mean successive "
                   f"overlap (2nd half) {mean_last:.3f}; live (s > ε + 1e-3τ) "
                   f"{int(C.support(hh['s'][-1], ap.eps, 1e-3, ap.tau).sum())}/{ap.r_total}; margin {fmt(margin)} "
                   f"(λ_min {fmt(lam)}, 2χ {fmt(2 * chi)})")
        st.rows.append(row(NAME_ID, ap, f"support (top-{k} of s) stability, {'count budget' if budget else 'FW only'}",
                           val, verdict, crit, n_id=ts["n_id"], changes=ts["changes"], overlap=ts["overlap"],
                           to_final=ts["to_final"], final=ts["final"]))
    st.plots["support"] = torch.stack([s.double() for s in h["s"]]).numpy().tolist()
    st.plots["regime_runs"] = {("budget" if b else "fw_only"): {"gap_est": hh["gap_est"],
                                                              "ref_gaps": [p["gap"] for p in hh["ref"]]}
                               for b, hh in runs.items()}
    st.timings["regime"] = time.perf_counter() - t0
