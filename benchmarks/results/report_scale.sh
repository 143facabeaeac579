#!/bin/bash
# Text at the issue's scale (2,400 examples x 3 epochs): one table, verdicts and plot per lr schedule,
# over every committed scale_rt24_* / scale_tw24_* record (finetune_compare.py --report-only), each
# family at the lr its tune_rt24_* and tune_seeds_rt24_* records chose for that schedule: the best mean
# accuracy over the tuning seeds that all of its lrs share (linear: round 8, seeds 100-102).
cd "$(dirname "$0")/../.."
files="/dev/null,$(ls benchmarks/results/scale_rt24_*.json benchmarks/results/scale_tw24_*.json benchmarks/results/tune_rt24_*.json benchmarks/results/tune_seeds_rt24_*.json | paste -sd, -)"
for sched in constant linear; do
    .venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets \
        --lr-schedule "$sched" --json "$files" --out "benchmarks/results/scale24_${sched}.md" \
        --plot-dir "benchmarks/results/scale24_${sched}"
done
