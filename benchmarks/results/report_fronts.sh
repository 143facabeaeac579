#!/usr/bin/env bash
# README's front table and benchmarks/results/front_*.png from the committed records (no training).
set -euo pipefail
cd "$(dirname "$0")/../.."
J=benchmarks/results
RT=$J/fronts_rt_adalora_lr3e-3_s0.json,$J/fronts_rt_adalora_lr3e-3_s1.json,$J/fronts_rt_adalora_lr3e-3_s2.json,$J/fronts_rt_debora_lr3e-3.json,$J/fronts_rt_s0.json,$J/fronts_rt_s1.json,$J/fronts_rt_s2.json,$J/fronts_rt_lora_s0.json,$J/fronts_rt_small.json,$J/fronts_rt_small2.json,$J/fronts_rt_ada2.json,$J/fronts_rt_r4_s0.json,$J/fronts_rt_r4_s1.json,$J/fronts_rt_r4_s2.json,$J/fronts_rotten-tomatoes_svdE.json
TW=$J/fronts_tweets_s0.json,$J/fronts_tweets_s1.json,$J/fronts_tweets_s2_debora.json,$J/fronts_tweets_s2_lora-r2.json,$J/fronts_tweets_s2_lora-r8.json,$J/fronts_tweets_svdE.json,$J/fronts_tweets_r1r4.json
FM=$J/fronts_fmnist_s0.json,$J/fronts_fmnist_s12.json
# the first --json file is the one a campaign writes; --report-only only reads them all
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets,fashion-mnist \
    --json "/dev/null,$RT,$TW,$FM" --out $J/fronts.md --plot-dir $J
