"""Write the report: ``report.md`` (summary table, estimator tables, criteria, restrictions),
``report.json`` (every number) and one PNG per instance."""
from __future__ import annotations

import json
import math
import os
from typing import List

import numpy as np
import torch


def _clean(o):
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _clean(o.detach().cpu().double().tolist())
    if isinstance(o, (np.floating, np.integer)):
        return _clean(o.item())
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (bool, int, float, str)) or o is None:
        return o
    return str(o)


def plot_cut(cut: dict, path: str) -> None:
    """One panel per key of checks/cut.py: the key against the exact removal cost per parameter, one point
    per component (the components the exact-ranked cut keeps filled)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    comps = cut["components"]
    exact = np.array([c["exact"] for c in comps])
    kept = np.argsort(-exact)[:cut["k"]]
    fields = {"σ²/param (default)": "sig2pp", "first-order Taylor (hypergradient)": "taylor1",
              "second-order Taylor": "taylor2", "K-FAC Fisher (svd_allocation=fisher)": "kfac"}
    fields = {label: f for label, f in fields.items() if f in comps[0]}     # records before the Fisher keys
    fig, ax = plt.subplots(1, len(fields), figsize=(5 * len(fields), 4.2))
    for a, (label, field) in zip(ax, fields.items()):
        key = np.array([c[field] for c in comps])
        a.scatter(key, exact, facecolors="none", edgecolors="C0", label="component")
        a.scatter(key[kept], exact[kept], color="C0", label=f"top {cut['k']} by exact cost")
        rho = cut.get("keys", {}).get(label, {}).get("rho", float("nan"))
        a.set_title(f"{label}: Spearman ρ = {rho:.2f}", fontsize=9)
        a.set_xlabel("key (per parameter)")
        a.axhline(0, color="k", lw=0.5)
    ax[0].set_ylabel("exact loss increase when removed alone, per parameter")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_study(st, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if st.plots.get("cut"):
        return plot_cut(st.plots["cut"], path)
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    P = st.plots
    est = P.get("estimators")
    if est:
        names = list(est["converged"])
        xs = np.arange(len(names))
        for j, regime in enumerate(("converged", "T_max")):
            rel = [est[regime][n]["rel"] for n in names]
            ax[0].bar(xs + 0.4 * j, [r if math.isfinite(r) else 0 for r in rel], 0.4, label=regime)
        ax[0].set_xticks(xs + 0.2)
        ax[0].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax[0].set_yscale("log")
        ax[0].axhline(1.0, color="k", lw=0.5)
        ax[0].set_title("relative error vs reference ∇F")
        ax[0].legend(fontsize=7)
    chi = P.get("chi2")
    if chi:
        for name, pts in chi.items():
            ax[1].loglog([p["b"] for p in pts], [max(p["chi2"], 1e-30) for p in pts], "o-", label=name)
        if hasattr(st, "p_tilde"):
            ax[1].axhline((st.p_tilde / 8) ** 2, color="k", ls="--", lw=0.8, label="(p̃/8)²")
        ax[1].set_xlabel("D1 batch size b")
        ax[1].set_title("χ² = sup_s E[e(s, s̄)²]")
        ax[1].legend(fontsize=6)
    th = P.get("thm62")
    if th:
        T = np.array(th["T"])
        ax[2].loglog(T, np.maximum(th["min_gap"], 1e-30), "o-", ms=3, label="min_{n<T} gap (true)")
        ax[2].loglog(T, np.maximum(th["bound"], 1e-30), "--", label="Thm 6.2 bound")
        ax[2].loglog(np.arange(1, len(th["est_gap"]) + 1), np.maximum(th["est_gap"], 1e-30), ".",
                     ms=2, alpha=0.5, label="gap of the estimate")
        if th["fit"]:
            b, a = th["fit"]
            ax[2].loglog(T, np.exp(a) * T ** b, ":", label=f"fit slope {b:.2f}")
        ax[2].set_xlabel("T")
        ax[2].set_title("FW gap")
        ax[2].legend(fontsize=7)
    sup = P.get("support")
    if sup:
        S = np.array(sup)
        for i in range(S.shape[1]):
            ax[3].plot(S[:, i], lw=1)
        ax[3].set_yscale("log")
        ax[3].set_xlabel("outer iteration n")
        ax[3].set_title("s_n (rank weights)")
    fig.suptitle(st.ap.name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def findings(studies: List) -> List[str]:
    """The closed form against the reference, per instance and regime (generated from the numbers)."""
    if not any(st.plots.get("estimators") for st in studies):
        return []
    out = ["## Closed form vs reference hypergradient (the finding that matters)", "",
           "Identity (Euler, exact at every point): diag(U_kᵀ ∂_{U_k} f1) = s ⊙ ∂_s f1 for every basis, "
           "so the closed form with Euclidean basis gradients is G = (1 − d)·∂_s f1 (d = 2: −∂_s f1; CP "
           "d = 4: −3 ∂_s f1), and with Riemannian gradients on oblique/Stiefel bases G = ∂_s f1 "
           "(the first-order estimator). The table measures how far these are from ∇F.", "",
           "| instance | regime | G euclidean: cos, rel.err | G riemannian: cos, rel.err | "
           "first-order: cos, rel.err | ‖∇F(s0)‖ |", "|---|---|---|---|---|---|"]
    for st in studies:
        est = st.plots.get("estimators")
        if not est:
            continue
        ref = next((r["data"].get("ref_norm") for r in st.rows if r["quantity"].startswith("K = ")), None)
        for regime in ("converged", "T_max"):
            e = est[regime]
            ge, fo = e["closed-form (euclidean)"], e["first-order"]
            gr = e.get("closed-form (riemannian)")
            out.append(f"| {st.ap.name} | {regime} | {ge['cos']:.3f}, {ge['rel']:.3g} | "
                       + (f"{gr['cos']:.3f}, {gr['rel']:.3g}" if gr else "= euclidean") +
                       f" | {fo['cos']:.3f}, {fo['rel']:.3g} | {'' if ref is None else f'{ref:.3g}'} |")
    out.append("")
    return out


def write(studies: List, out: str, meta: dict) -> dict:
    os.makedirs(out, exist_ok=True)
    rows = [r for st in studies for r in st.rows]
    pngs = []
    for st in studies:
        p = os.path.join(out, f"{st.ap.name}.png")
        try:
            plot_study(st, p)
            pngs.append(os.path.basename(p))
        except Exception as err:  # pragma: no cover - plotting must not lose the numbers
            print(f"plot of {st.ap.name} failed: {err}")
    doc = {"meta": meta, "rows": rows,
           "instances": [{"name": st.ap.name, "description": st.ap.description,
                          "restricted": st.ap.restricted, "timings": st.timings,
                          "plots": st.plots} for st in studies]}
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(_clean(doc), fh, indent=1)
    lines = ["# theory_checks report", "",
             f"Command: `{meta.get('command', '')}`  ", f"Device: {meta.get('device')}; threads: "
             f"{meta.get('threads')}; total run time: {meta.get('seconds', 0):.0f} s; date: {meta.get('date')}", "",
             "Verdict criteria are fixed in `theory_checks/criteria.py` (stated per row below).", "",
             "## Summary", "", "| check | instance | quantity | measured | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['instance']} | {r['quantity']} | {r['value']} | **{r['verdict']}** |")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("holds", "fails", "inconclusive")}
    lines += ["", f"Totals: {counts}", ""]
    lines += findings(studies)
    lines += ["## Estimators against the reference hypergradient", ""]
    for st in studies:
        est = st.plots.get("estimators")
        if not est:
            continue
        lines += [f"### {st.ap.name}", "", "| estimator | cos (conv.) | rel.err (conv.) | cos (T_max) | "
                  "rel.err (T_max) | seconds |", "|---|---|---|---|---|---|"]
        for n in est["converged"]:
            a, b = est["converged"][n], est["T_max"][n]
            lines.append(f"| {n} | {a['cos']:.3g} | {a['rel']:.3g} | {b['cos']:.3g} | {b['rel']:.3g} | "
                         f"{a['seconds']:.3g} |")
        lines.append("")
    lines += ["## Problems and restrictions", ""]
    for st in studies:
        lines += [f"- **{st.ap.name}**: {st.ap.description}. Restriction: {st.ap.restricted}. "
                  f"Time: {st.timings.get('total', 0):.1f} s. Plot: `{st.ap.name}.png`"]
    lines += ["", "## Criteria", ""]
    seen = set()
    for r in rows:
        key = (r["check"], r["criterion"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r['check']}: {r['criterion']}")
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return doc
