#!/usr/bin/env bash
# README's front table, verdicts and benchmarks/results/front_*.png from every committed record
# (benchmarks/results/fronts_*.json, tuning records included: they say which lr each method is judged at).
# No training.
set -euo pipefail
cd "$(dirname "$0")/../.."
J=benchmarks/results
ALL=$(ls $J/fronts_*.json | paste -sd, -)
# the first --json file is the one a campaign writes; --report-only only reads them all
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets,fashion-mnist \
    --json "/dev/null,$ALL" --out $J/fronts.md --plot-dir $J
