#!/usr/bin/env bash
# Fashion-MNIST wall time of the image preset, side by side (docs/rank_selection.md, round 11): one `--preset
# oblique-svd` run (target_params 45,568, LoRA r=2's size) and one PEFT LoRA r=8 run at the same time, one thread each,
# the linear lr schedule at the tuned 3e-3, so that both see the same load. Records already in the JSON
# files are skipped (delete them to re-measure). SEEDS="0 1 2" by default (round 13 added 3 4 5).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
FM="--tasks fashion-mnist --examples 2400 --eval-examples 2000 --epochs 3 --lr 3e-3 --lr-schedule linear
    --out /tmp/wall_fmnist11/w.md --plot-dir /tmp/wall_fmnist11"
SEEDS=${SEEDS:-"0 1 2"}
for S in $SEEDS; do
.venv/bin/python benchmarks/finetune_compare.py $FM --methods debora --preset oblique-svd --target-ranks "" \
    --target-params 45568 --debora-label oblique-svd --seed-list $S --json benchmarks/results/wall_fmnist11_oblsvd.json &
.venv/bin/python benchmarks/finetune_compare.py $FM --methods lora-r8 --seed-list $S \
    --json benchmarks/results/wall_fmnist11_lora.json &
wait
done
.venv/bin/python benchmarks/wall_ratio.py benchmarks/results/wall_fmnist11_oblsvd.json benchmarks/results/wall_fmnist11_lora.json "oblique-svd" "LoRA r=8"
