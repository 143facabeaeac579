"""End-of-run summary: a markdown table (accuracy, trainable parameters, per-layer ranks) + JSON."""
from __future__ import annotations

import json
import os
from typing import Any, Dict


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _budget(summary: Dict[str, Any]) -> str:
    """The budget the user set and where the run landed against it."""
    if summary.get("target_params") is not None:
        p, end = summary["target_params"], summary.get("adapter_end")
        return f"target_params {p:,} adapter parameters (ended at {end:,}, {100 * end / p:.1f}%)"
    if summary.get("target_rank") is not None:
        layers = summary.get("layers") or 0
        target = max(1, round(summary["target_rank"] * layers))
        return f"target_rank {summary['target_rank']:g} ({target} components over {layers} adapters)"
    return "none (the paper's rule: components at ε are removed)"


def render(summary: Dict[str, Any]) -> str:
    lines = ["# dEBORA training summary", ""]
    lines += ["| metric | value |", "|---|---|"]
    rows = [
        ("model", summary.get("model")),
        ("dataset", summary.get("dataset")),
        ("examples D1 / D2 / eval", "{D1} / {D2} / {eval}".format(**summary.get("splits", {}))
         if summary.get("splits") else None),
        ("outer iterations", summary.get("iterations")),
        ("eval accuracy: start → end", f"{_fmt_pct(summary.get('eval_acc_start'))} → "
                                       f"{_fmt_pct(summary.get('eval_acc_end'))}"),
        ("best eval accuracy", _fmt_pct(summary.get("eval_acc_best"))),
        ("eval loss: start → end", f"{summary.get('eval_loss_start', float('nan')):.4f} → "
                                   f"{summary.get('eval_loss_end', float('nan')):.4f}"),
        ("trainable parameters: start → end", f"{summary.get('trainable_start'):,} → "
                                              f"{summary.get('trainable_end'):,}"),
        ("adapter parameters: start → end", f"{summary.get('adapter_start'):,} → "
                                            f"{summary.get('adapter_end'):,}"),
        ("total rank: start → end", f"{summary.get('rank_start')} → {summary.get('rank_end')}"),
        ("budget", _budget(summary)),
        ("final FW gap", "n/a" if summary.get("fw_gap_end") is None else f"{summary['fw_gap_end']:.3g}"),
        ("skipped non-finite steps", summary.get("nonfinite_skipped")),
        ("wall time", f"{summary.get('wall_time_s', 0):.1f} s"),
        ("device", summary.get("device")),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    ranks = summary.get("ranks_end") or {}
    if ranks:
        start = summary.get("ranks_start") or {}
        lines += ["", "| layer | rank start | rank end |", "|---|---|---|"]
        lines += [f"| {name} | {start.get(name, '')} | {r} |" for name, r in ranks.items()]
    return "\n".join(lines) + "\n"


def write(summary: Dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    text = render(summary)
    for name, content in (("summary.md", text), ("summary.json", json.dumps(summary, indent=1))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(content)
        os.replace(tmp, os.path.join(out_dir, name))
    return text
