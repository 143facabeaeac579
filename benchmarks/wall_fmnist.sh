#!/usr/bin/env bash
# Fashion-MNIST wall time, side by side: one dEBORA run and one PEFT LoRA r=8 run at the same time, one
# thread each, so that both see the same load (docs/rank_selection.md, round 5). Records already in the JSON files are
# skipped (delete them to re-measure).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
FM="--tasks fashion-mnist --examples 2400 --eval-examples 2000 --epochs 3 --out /tmp/wall_fmnist/w.md --plot-dir /tmp/wall_fmnist --lr 1e-3"
for S in 0 1; do
.venv/bin/python benchmarks/finetune_compare.py $FM --methods debora --preset fixed-oblique --target-ranks "" --init-ranks 2 --debora-label fixed-oblique --seed-list $S --json benchmarks/results/wall_fmnist5_fixedobl.json &
.venv/bin/python benchmarks/finetune_compare.py $FM --methods lora-r8 --seed-list $S --json benchmarks/results/wall_fmnist5_lora.json &
wait
.venv/bin/python benchmarks/finetune_compare.py $FM --methods debora --preset svd-cut --target-ranks 2 --debora '{"basis":"oblique","init_rank":4,"prune_start":0.5,"prune_end":0.6,"refold_magnitudes":"init_s","svd_allocation":"sigma2_per_param"}' --debora-label "oblique r0=4, cut at 50-60%, refold, sigma2/param" --seed-list $S --json benchmarks/results/wall_fmnist5_cut.json &
.venv/bin/python benchmarks/finetune_compare.py $FM --methods lora-r8 --seed-list $S --json benchmarks/results/wall_fmnist5_lora_b.json &
wait
done
