"""Two dEBORA variants side by side, paired by seed: variant A minus variant B in held-out accuracy
(points) per task and setting, with the 95% Student-t interval of the mean difference
(``finetune_compare.paired_by_seed``), and their mean adapter sizes. A markdown table on stdout.

    python benchmarks/variant_paired.py --json A.json,B.json,... --a "LABEL A" --b "LABEL B" [--lr 0.003]

A record belongs to a variant when its ``setting`` ends with its label (``target_rank=2 LABEL``; several
labels of one variant, e.g. a development run's shorter one, separated by ``|``); the
setting's prefix (the budget) and the task pair the rows. Only dEBORA records at ``--lr`` are read
(tuning files hold several lrs per seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_compare import paired_by_seed, paired_verdict  # noqa: E402


def rows(records, label_a, label_b, lr, budgets=None):
    """Markdown rows, one per (task, budget); ``budgets=(budget_a, budget_b)`` pairs A at one budget with
    B at another instead (e.g. a fixed rank with a cut to that rank)."""
    groups = {}
    for r in records:
        if r["method"] != "debora" or abs(r["lr"] - lr) > 1e-12:
            continue
        for which, labels in (("a", label_a), ("b", label_b)):
            for label in labels.split("|"):
                if r["setting"].endswith(" " + label):
                    budget = r["setting"][: -len(label) - 1]
                    if budgets is not None:
                        if budget != budgets[0 if which == "a" else 1]:
                            continue
                        budget = f"{budgets[0]} vs {budgets[1]}"
                    groups.setdefault((r["task"], budget), {"a": {}, "b": {}})[which][r["seed"]] = r
    out = []
    for (task, budget), g in sorted(groups.items()):
        seeds, diffs, mean, ci = paired_by_seed(list(g["a"].values()), list(g["b"].values()))
        if mean is None:
            continue
        size = lambda side: statistics.mean(g[side][s]["adapter_params"] for s in seeds)  # noqa: E731
        acc = lambda side: statistics.mean(100 * g[side][s]["acc"] for s in seeds)  # noqa: E731
        verdict = paired_verdict(ci, "A")
        out.append(f"| {task} | {budget} | {','.join(map(str, seeds))} | {acc('a'):.2f} ({size('a') / 1e3:.1f}k) | "
                   f"{acc('b'):.2f} ({size('b') / 1e3:.1f}k) | {mean:+.2f} "
                   + (f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + f" | {verdict} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="comma-separated record files")
    ap.add_argument("--a", required=True, help="label(s) of variant A (the end of its records' setting; several: 'L1|L2')")
    ap.add_argument("--b", required=True, help="label of variant B")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budgets", default=None, help="'BUDGET_A,BUDGET_B': pair A at one budget with B at "
                                                   "another (e.g. 'init_rank=2,target_rank=2')")
    args = ap.parse_args(argv)
    records = [r for f in args.json.split(",") if f for r in json.load(open(f))]
    print(f"A = {args.a!r}, B = {args.b!r} (dEBORA records at lr {args.lr:g})\n")
    print("| task | budget | seeds | A: acc % (adapter) | B: acc % (adapter) | A − B, points [95% CI] | verdict |")
    print("|---|---|---|---|---|---|---|")
    budgets = tuple(args.budgets.split(",")) if args.budgets else None
    print("\n".join(rows(records, args.a, args.b, args.lr, budgets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
