"""PNG plots of a run from its metrics JSONL (matplotlib, Agg backend: no display needed).

* ``ranks.png``      — per-layer rank over outer iterations (heatmap, layers × iterations);
* ``s_trajectories.png`` — every component s_i over iterations (one line each; ends when truncated);
* ``fw_gap.png``     — Frank-Wolfe gap, log scale;
* ``curves.png``     — lower/upper training loss and evaluation loss/accuracy.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from .metrics import iter_kind, read_metrics


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _short(name: str) -> str:
    for token in ("encoder.layer.", "bert.", "roberta.", "deberta.", "model.", "_blocks."):
        name = name.replace(token, "")
    return name


def make_plots(metrics_path: str, out_dir: str) -> List[str]:
    records = read_metrics(metrics_path)
    train = list(iter_kind(records, "train"))
    evals = list(iter_kind(records, "eval"))
    plt = _plt()
    written: List[str] = []
    os.makedirs(out_dir, exist_ok=True)

    # rank heatmap
    rank_recs = [r for r in train if r.get("ranks")]
    if rank_recs:
        layers = list(rank_recs[0]["ranks"].keys())
        mat = np.array([[r["ranks"].get(l, 0) for r in rank_recs] for l in layers], dtype=float)
        its = [r["iteration"] for r in rank_recs]
        fig, ax = plt.subplots(figsize=(10, max(3, 0.18 * len(layers) + 1.5)))
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(its[0] - 0.5, its[-1] + 0.5, len(layers) - 0.5, -0.5))
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([_short(l) for l in layers], fontsize=6)
        ax.set_xlabel("outer iteration")
        ax.set_title("rank per layer")
        fig.colorbar(im, ax=ax, label="rank")
        fig.tight_layout()
        p = os.path.join(out_dir, "ranks.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # s trajectories
    s_recs = [r for r in train if r.get("s")]
    if s_recs:
        fig, ax = plt.subplots(figsize=(9, 5))
        series: Dict[str, Dict[int, float]] = {}
        for r in s_recs:
            for layer, vals in r["s"].items():
                ids = r.get("s_ids", {}).get(layer, list(range(len(vals))))
                for i, v in zip(ids, vals):
                    series.setdefault(f"{layer}[{i}]", {})[r["iteration"]] = v
        for key, pts in series.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], lw=0.7, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("outer iteration")
        ax.set_ylabel("s_i (log)")
        ax.set_title(f"s trajectories ({len(series)} components)")
        fig.tight_layout()
        p = os.path.join(out_dir, "s_trajectories.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # FW gap
    gap = [(r["iteration"], r["fw_gap"]) for r in train if r.get("fw_gap") is not None]
    if gap:
        fig, ax = plt.subplots(figsize=(8, 4))
        xs, ys = zip(*gap)
        ax.plot(xs, np.maximum(np.abs(ys), 1e-12), lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("outer iteration")
        ax.set_ylabel("FW gap")
        ax.set_title("Frank-Wolfe gap")
        fig.tight_layout()
        p = os.path.join(out_dir, "fw_gap.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # train / eval curves
    if train or evals:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        if train:
            it = [r["iteration"] for r in train]
            for key, label in (("lower_loss", "train loss (D2, lower)"), ("upper_loss", "train loss (D1, upper)")):
                ys = [r.get(key) for r in train]
                if any(y is not None for y in ys):
                    a1.plot(it, [np.nan if y is None else y for y in ys], lw=0.6, alpha=0.6, label=label)
            accs = [r.get("train_acc") for r in train]
            if any(a is not None for a in accs):
                a2.plot(it, [np.nan if a is None else a for a in accs], lw=0.6, alpha=0.6, label="train acc (running)")
        if evals:
            it = [r["iteration"] for r in evals]
            a1.plot(it, [r.get("eval_loss") for r in evals], "o-", label="eval loss")
            a2.plot(it, [r.get("eval_acc") for r in evals], "o-", label="eval accuracy")
        a1.set_xlabel("outer iteration")
        a1.set_title("loss")
        a1.legend(fontsize=7)
        a2.set_xlabel("outer iteration")
        a2.set_title("accuracy")
        a2.legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(out_dir, "curves.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
