#!/bin/bash
# Fashion-MNIST with the linear lr schedule (round 10): one table, verdicts and plot over every committed
# record of the linear-schedule campaigns (rounds 6, 9, 10, 11), each family and variant at the lr its own
# tuning records chose on seeds 100-102 (round 10: fronts_fmnist10_lin_*.json hold tuning and report rows);
# a variant with reports at one lr and no tuning counts as "untuned". The verdict adds a dominance line for
# the default preset's rows alone ('prune 10-70%').
cd "$(dirname "$0")/../.."
files="/dev/null,$(ls benchmarks/results/fronts_fmnist11_*.json benchmarks/results/fronts_fmnist10_*.json benchmarks/results/fronts_fmnist6_lin_*.json \
    benchmarks/results/fronts_fmnist9_lin_*.json | paste -sd, -)"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks fashion-mnist --lr-schedule linear \
    --json "$files" --out benchmarks/results/fmnist10_linear.md --plot-dir benchmarks/results/fmnist10_linear \
    --default-variant "prune 10-70%"
