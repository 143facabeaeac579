#!/bin/bash
# Fashion-MNIST with the linear lr schedule (round 10): one table, verdicts and plot over every committed
# record of the linear-schedule campaigns (rounds 6, 9, 10, 11), each family and variant at the lr its own
# tuning records chose on seeds 100-102 (round 10: fronts_fmnist10_lin_*.json hold tuning and report rows);
# a variant with reports at one lr and no tuning counts as "untuned". The verdict adds a dominance line for
# the rows of the image preset alone (oblique-svd, what `debora train` uses on images since round 11; the
# text default's rows, 'prune 10-70%', dominate 0 of 4 here).
cd "$(dirname "$0")/../.."
files="/dev/null,$(ls benchmarks/results/fronts_fmnist11_*.json benchmarks/results/fronts_fmnist10_*.json benchmarks/results/fronts_fmnist6_lin_*.json \
    benchmarks/results/fronts_fmnist9_lin_*.json | grep -v '_s345_' | paste -sd, -)"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks fashion-mnist --lr-schedule linear \
    --json "$files" --out benchmarks/results/fmnist10_linear.md --plot-dir benchmarks/results/fmnist10_linear \
    --default-variant "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param"
# round 11: fresh seeds 3-5 for LoRA and the oblique-svd preset's settings (chosen on seeds 0-2), a table of
# their own; the lrs come from the same tuning records
tune="$(ls benchmarks/results/fronts_fmnist10_lin_lora.json benchmarks/results/fronts_fmnist11_tune_svd8_s2pp.json | paste -sd, -)"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks fashion-mnist --lr-schedule linear \
    --json "/dev/null,$(ls benchmarks/results/fronts_fmnist11_s345_*.json | paste -sd, -),$tune" \
    --out benchmarks/results/fmnist11_s345.md --plot-dir benchmarks/results/fmnist11_s345
