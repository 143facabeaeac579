"""Check of the selection the default makes (``TrainConfig()``, docs/rank_selection.md round 12): is the key of
its SVD cut a good proxy for what a component is worth to the loss?

The default holds s at ``init_s`` (no Frank-Wolfe step: no hypergradient is used) and chooses the ranks by
the SVD of what training changed, C_ℓ = ΔW_ℓ − ΔW_ℓ0 = Σ_j σ_j u_j v_jᵀ (``debora.refactor``, unfolded),
removing first the components with the smallest key σ_j² / p_ℓ over all layers (``svd_allocation=
"sigma2_per_param"``; p_ℓ = ``component_numel()``, what one component of layer ℓ costs). Eckart-Young
makes σ_j² the loss of a cut *in ΔW's Frobenius norm*; what the user cares about is the task loss f. Here,
at a lower level trained to convergence in the default's regime (its basis, magnitude init_s, scaling α/r0,
weight decay, D1 = D2; the adapter's start ΔW0 folded into the base weight as the trainer does), the
leading r0 components of every layer's C_ℓ are compared by

- the exact cost of removing component j alone, Δ_j = f(Ψ − σ_j u_j v_jᵀ) − f(Ψ) (Ψ: the rank-r0 truncation
  of the change, what the first unfolded cut keeps), per parameter: Δ_j / p_ℓ;
- the default's key σ_j² / p_ℓ, and σ_j (``svd_allocation="sigma"``);
- the first-order Taylor estimate −σ_j ⟨∂_Ψ f, u_j v_jᵀ⟩ / p_ℓ: the hypergradient's signal (with D1 = D2 at a
  converged lower level ∂f/∂σ_j is the hypergradient of the component's magnitude, the envelope theorem),
  and the second-order one, adding ½σ_j² ⟨u_j v_jᵀ, ∇²_Ψ f [u_j v_jᵀ]⟩ (one HVP per component);
- the second-order cost at a minimum with the empirical Fisher for the Hessian (Optimal Brain Damage),
  ½σ_j² mean_i ⟨g_i, u_j v_jᵀ⟩² / p_ℓ (g_i: example i's own gradient, one backward per example), and its
  Kronecker-factored form ½σ_j² (u_jᵀ S_ℓ u_j)(v_jᵀ A_ℓ v_j) / p_ℓ, the key ``svd_allocation="fisher"``
  trains with, computed by the trainer's own ``debora.train.sensitivity.kronecker_factors`` (batches of 32);

by Spearman's rank correlation with Δ_j / p_ℓ, and by the loss increase of cutting to the default's count
(target_rank × layers, every layer keeping its best component, as the trainer does) with each key, against
the same cut ranked by the exact Δ_j / p_ℓ (greedy: the best single-component ranking, not the best subset).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bilevel import pytree as pt

from .. import criteria as CR
from .. import solvers
from ..problems.base import AdapterProblem
from ..study import Study, StudyConfig, fmt, row

NAME = "SVD cut [default]"


def default_preset() -> Dict[str, object]:
    """The default's regime, read from ``TrainConfig()`` so that the two cannot drift apart."""
    from debora.train import TrainConfig
    d = TrainConfig()
    assert d.s_held() and d.prune_by == "svd" and d.svd_unfold and d.basis in ("oblique", "stiefel") \
        and d.svd_allocation == "sigma2_per_param" and d.split == "same" and d.init_s is not None, \
        "the default left the regime this check models; update theory_checks/checks/cut.py"
    return dict(basis=d.basis, init_s=float(d.init_s), init_rank=d.init_rank, alpha=d.alpha, eps=d.eps,
                tau=d.tau, weight_decay=d.weight_decay, target_rank=d.target_rank)


PRESET = default_preset()


def instances(problem: str, device: str = "cpu", quick: bool = False):
    """(factory, StudyConfig) for the toy matrix layer and MiniLM-top in the default's regime (CP
    adapters of a larger kernel have no SVD: no CNN instance)."""
    P = PRESET
    tau = max(float(P["tau"]), 2 * P["init_rank"] * P["init_s"])     # s0 feasible (no FW step uses τ)
    common = dict(basis=P["basis"], eps=P["eps"], tau=tau, weight_decay=P["weight_decay"], s0=P["init_s"],
                  scaling=P["alpha"] / P["init_rank"], split="same", rank=P["init_rank"])
    if problem == "toy":
        from ..problems.toy import make_toy
        cfg = StudyConfig(lbfgs_iter=500, lbfgs_gtol=1e-10, seed=0)
        return [(lambda: make_toy("matrix", name="toy-matrix-cut", **common), cfg)]
    if problem == "minilm":
        from ..problems.minilm import make_minilm
        cfg = StudyConfig(lbfgs_iter=150 if quick else 1500, lbfgs_gtol=1e-8, seed=0)
        return [(lambda: make_minilm(device=device, name="minilm-cut", **common), cfg)]
    return []


def fold_start(ap: AdapterProblem) -> Dict[str, torch.Tensor]:
    """Fold the adapters' start ΔW0 into the base weights (the trainer's ``fold_init_``), so that training
    starts from the pretrained function; returns ΔW0 per layer."""
    d0 = {k: v.detach().clone() for k, v in ap.psi_point(ap.x0, ap.y_init).items()}
    with torch.no_grad():
        for name, ad in ap.adapters.items():
            ap.frozen[name] = ap.frozen[name] - d0[name]
            ad.weight_ref.copy_(ap.frozen[name])
    return d0


def components(ap: AdapterProblem, change: Dict[str, torch.Tensor], r0: int):
    """The leading ``r0`` singular triplets of every layer's change: [(layer, j, σ, u, v, p_ℓ)]."""
    out = []
    for l in ap.layers:
        U, S, Vh = torch.linalg.svd(change[l.name].double(), full_matrices=False)
        p = ap.adapters[l.name].component_numel()
        out += [(l.name, j, float(S[j]), U[:, j], Vh[j], p) for j in range(min(r0, S.numel()))]
    return out


def rebuild(ap: AdapterProblem, d0, comps, keep) -> Dict[str, torch.Tensor]:
    """ΔW0 + Σ_{kept} σ u vᵀ per layer."""
    out = {l.name: d0[l.name].clone() for l in ap.layers}
    for c, k in zip(comps, keep):
        if k:
            out[c[0]] = out[c[0]] + c[2] * torch.outer(c[3], c[4])
    return out


def cut_by(comps, key: List[float], k: int) -> List[bool]:
    """Keep ``k`` components: every layer's best by ``key``, then the best of the rest over all layers."""
    keep = [False] * len(comps)
    best: Dict[str, int] = {}
    for i, c in enumerate(comps):
        if c[0] not in best or key[i] > key[best[c[0]]]:
            best[c[0]] = i
    for i in best.values():
        keep[i] = True
    rest = sorted((i for i in range(len(comps)) if not keep[i]), key=lambda i: -key[i])
    for i in rest[:max(0, k - len(best))]:
        keep[i] = True
    return keep


def spearman(a: List[float], b: List[float]) -> float:
    from scipy import stats
    rho = stats.spearmanr(a, b).statistic
    return float(rho)


def rho_verdict(rho: float) -> str:
    if rho != rho:
        return CR.INCONCLUSIVE
    if rho >= CR.CUT_RHO_HOLDS:
        return CR.HOLDS
    return CR.FAILS if rho < CR.CUT_RHO_FAILS else CR.INCONCLUSIVE


def loss_verdict(ratio: float) -> str:
    if ratio != ratio:
        return CR.INCONCLUSIVE
    if ratio <= CR.CUT_LOSS_HOLDS:
        return CR.HOLDS
    return CR.FAILS if ratio > CR.CUT_LOSS_FAILS else CR.INCONCLUSIVE


def fisher_keys(ap: AdapterProblem, head, psi, comps, D, batch: int = 32):
    """(empirical Fisher, K-FAC Fisher) removal cost per parameter of every component at Ψ: ½σ² mean_i
    ⟨g_i, u vᵀ⟩² / p with g_i = ∂ℓ_i/∂Ψ_ℓ one example at a time, and ½σ² (uᵀS u)(vᵀA v) / p with (A, S) from
    ``debora.train.sensitivity.kronecker_factors`` over batches of ``batch`` examples (the trainer's code)."""
    from debora.train.sensitivity import kronecker_factors
    n = next(iter(D.values())).shape[0]
    sums = [0.0] * len(comps)
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in D.items()}
        g = torch.func.grad(lambda dd: ap.loss_of_deltas(dd, head, one))(psi)
        for c, (name, _, _, u, v, _) in enumerate(comps):
            sums[c] += float(u @ g[name].detach().double() @ v) ** 2
    fisher = [0.5 * c[2] ** 2 * q / n / c[5] for c, q in zip(comps, sums)]
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in psi.items()}
    chunks = [{k: v[i:i + batch] for k, v in D.items()} for i in range(0, n, batch)]
    factors = kronecker_factors(ap.adapters, chunks, lambda b: ap.loss_of_deltas(leaves, head, b))
    kfac = []
    for name, _, sg, u, v, p in comps:
        A, S = (f.double() for f in factors[name])
        kfac.append(0.5 * sg * sg * float(u @ S @ u) * float(v @ A @ v) / p)
    return fisher, kfac


def run(st: Study) -> Dict[str, object]:
    ap, cfg, P = st.ap, st.cfg, PRESET
    d0 = fold_start(ap)
    s = ap.x0["s"]
    low = solvers.converge_lower(ap, {"s": s}, ap.y_init, gtol=cfg.lbfgs_gtol, max_iter=cfg.lbfgs_iter)
    D = ap.D2
    head = ap.head_of(pt.detach(low.y))
    f = lambda dd: ap.loss_of_deltas(dd, head, D)  # noqa: E731
    psi_trained = ap.psi_point({"s": s}, low.y)
    change = {k: psi_trained[k] - d0[k] for k in psi_trained}
    comps = components(ap, change, P["init_rank"])
    psi = rebuild(ap, d0, comps, [True] * len(comps))          # the rank-r0 truncation of the change
    with torch.no_grad():
        f_trained, f_psi, f_start = float(f(psi_trained)), float(f(psi)), float(f(d0))
    grad_f = {k: v.detach() for k, v in torch.func.grad(f)(psi).items()}
    exact, sigma, sig2pp, taylor1, taylor2 = [], [], [], [], []
    for name, j, sg, u, v, p in comps:
        direction = {k: torch.zeros_like(t) for k, t in psi.items()}
        direction[name] = torch.outer(u, v)
        with torch.no_grad():
            removed = dict(psi, **{name: psi[name] - sg * direction[name]})
            exact.append((float(f(removed)) - f_psi) / p)
        hv = torch.func.jvp(torch.func.grad(f), (psi,), (direction,))[1]
        g1 = -sg * float((grad_f[name] * direction[name]).sum())
        curv = float((hv[name].detach() * direction[name]).sum())
        taylor1.append(g1 / p)
        taylor2.append((g1 + 0.5 * sg * sg * curv) / p)
        sigma.append(sg)
        sig2pp.append(sg * sg / p)
    fisher, kfac = fisher_keys(ap, head, psi, comps, D)
    k = int(round(P["target_rank"] * len(ap.layers)))
    keys = {"σ²/param (default)": sig2pp, "σ": sigma, "first-order Taylor (hypergradient)": taylor1,
            "second-order Taylor": taylor2, "empirical Fisher (OBD)": fisher,
            "K-FAC Fisher (svd_allocation=fisher)": kfac}

    def cut_loss(key):
        with torch.no_grad():
            return float(f(rebuild(ap, d0, comps, cut_by(comps, key, k)))) - f_psi

    oracle = cut_loss(exact)
    gen = torch.Generator().manual_seed(cfg.seed)
    randoms = [cut_loss(torch.rand(len(comps), generator=gen).tolist()) for _ in range(20)]
    summary = dict(f_start=f_start, f_trained=f_trained, f_rank_r0=f_psi, lower_grad_norm=low.grad_norm,
                   k=k, n_components=len(comps), oracle_increase=oracle,
                   random_increase=sum(randoms) / len(randoms),
                   components=[dict(layer=c[0], j=c[1], sigma=c[2], params=c[5], exact=e, sig2pp=q, taylor1=t1,
                                    taylor2=t2, fisher=fi, kfac=kf)
                               for c, e, q, t1, t2, fi, kf in zip(comps, exact, sig2pp, taylor1, taylor2, fisher,
                                                                  kfac)])
    text_rho = (f"holds if Spearman ρ ≥ {CR.CUT_RHO_HOLDS} against the exact removal cost per parameter; "
                f"fails if ρ < {CR.CUT_RHO_FAILS}; else inconclusive")
    text_loss = (f"holds if the cut's loss increase ≤ {CR.CUT_LOSS_HOLDS:g}× that of the cut ranked by the "
                 f"exact cost; fails if > {CR.CUT_LOSS_FAILS:g}×; else inconclusive (where the exact-ranked cut "
                 "lowers the loss: holds if this cut does not raise it)")
    st.rows.append(row(NAME, ap, f"lower level converged (Riemannian ‖∇g‖) at s = {P['init_s']:g}; f start → "
                       f"trained → rank-{P['init_rank']} truncation", f"{fmt(low.grad_norm)}; {fmt(f_start, 5)} → "
                       f"{fmt(f_trained, 5)} → {fmt(f_psi, 5)}",
                       CR.HOLDS if low.grad_norm <= 1e-4 else CR.INCONCLUSIVE,
                       "holds if the lower level is converged (‖∇g‖ ≤ 1e-4): the keys are compared at a "
                       "stationary point, as the envelope theorem needs", **summary))
    summary["keys"] = {}
    for label, key in keys.items():
        rho = spearman(key, exact)
        inc = cut_loss(key)
        ratio = inc / oracle if oracle > 0 else (1.0 if inc <= 0 else float("inf"))
        summary["keys"][label] = dict(rho=rho, increase=inc, ratio=ratio)
        st.rows.append(row(NAME, ap, f"{label}: Spearman ρ with the exact removal cost ({len(comps)} components)",
                           fmt(rho), rho_verdict(rho), text_rho, key=label))
        st.rows.append(row(NAME, ap, f"{label}: loss increase of the cut to {k} components / exact-ranked cut's "
                           f"(random cut: {fmt(summary['random_increase'])})",
                           f"{fmt(inc)} / {fmt(oracle)} = {fmt(ratio)}" if oracle > 0 else
                           f"{fmt(inc)} vs {fmt(oracle)} (the exact-ranked cut lowers the loss)",
                           loss_verdict(ratio), text_loss,
                           key=label))
    st.plots["cut"] = summary
    return summary


def run_cut(problem: str, device: str = "cpu", quick: bool = False, log=print) -> List[Study]:
    """This check on ``problem`` (toy | minilm; nothing for cnn)."""
    import time
    out = []
    for factory, cfg in instances(problem, device, quick):
        t0 = time.perf_counter()
        ap = factory()
        ap.description += (f"; default regime: {PRESET['basis']} bases, s held at {PRESET['init_s']:g}, "
                           f"r0 = {PRESET['init_rank']}, scaling α/r0 = {PRESET['alpha'] / PRESET['init_rank']:g}, "
                           f"ΔW0 folded, cut to target rank {PRESET['target_rank']:g}/adapter")
        log(f"[{ap.name}] {ap.description}")
        st = Study(ap, cfg, log)
        run(st)
        st.timings["total"] = time.perf_counter() - t0
        for r in st.rows:
            log(f"    {r['check']:<18} {r['quantity'][:80]:<80} {r['value']}  => {r['verdict'].upper()}")
        out.append(st)
    return out
