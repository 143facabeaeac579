"""Side-by-side wall ratios from two finetune_compare.py record files (the wall_*.sh scripts' summary):

    python benchmarks/wall_ratio.py OURS.json THEIRS.json "oblique-svd" "LoRA r=8"

One line per seed both files hold (walls, accuracies, ratio), then the mean ratio."""
import json
import sys


def main(ours: str, theirs: str, name_ours: str, name_theirs: str) -> None:
    d = {r["seed"]: r for r in json.load(open(ours))}
    l = {r["seed"]: r for r in json.load(open(theirs))}
    ratios = []
    for s in sorted(set(d) & set(l)):
        ratios.append(d[s]["wall"] / l[s]["wall"])
        print(f"seed {s}: {name_ours} {d[s]['wall']:.1f} s ({100 * d[s]['acc']:.2f}%), {name_theirs} "
              f"{l[s]['wall']:.1f} s ({100 * l[s]['acc']:.2f}%): {ratios[-1]:.2f}x")
    if ratios:
        print(f"mean ratio over {len(ratios)} seed(s): {sum(ratios) / len(ratios):.2f}x")


if __name__ == "__main__":
    main(*sys.argv[1:5])
