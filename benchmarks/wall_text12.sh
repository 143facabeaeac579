#!/usr/bin/env bash
# Text wall time of the round-12 default, side by side (docs/rank_selection.md, round 12): one dEBORA run
# (target_rank 2, the SVD-cut selection with s held at 0.1, written out so that it does not depend on
# the checkout's defaults) and one PEFT LoRA r=8 run at the same time, one thread each, 2,400 x 3, each at
# its tuned lr with the linear schedule, so that both see the same load. Records already in the JSON files
# are skipped (delete them to re-measure). SEEDS="0 1 2" and TASK=rotten-tomatoes by default (records in
# wall_text12_{debora,lora}.json); TASK=tweets writes wall_text12_tweets_{debora,lora}.json.
# ALLOC=taylor (round 14) ranks the cut by its first-order loss cost instead of sigma2_per_param; its
# records get the suffix _taylor (wall_text12[_tweets]_taylor_{debora,lora}.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
SEEDS=${SEEDS:-"0 1 2"}
TASK=${TASK:-rotten-tomatoes}
ALLOC=${ALLOC:-sigma2_per_param}
if [ "$TASK" = rotten-tomatoes ]; then STEM=wall_text12; else STEM="wall_text12_${TASK//-/_}"; fi
LABEL="default (round 12)"
if [ "$ALLOC" != sigma2_per_param ]; then STEM="${STEM}_${ALLOC}"; LABEL="svd cut at s 0.1, $ALLOC (round 14)"; fi
RT="--tasks $TASK --examples 2400 --epochs 3 --lr-schedule linear --out /tmp/wall_text12/w.md
    --plot-dir /tmp/wall_text12"
SEL='{"fw_step_size": 0.0, "init_s": 0.1, "prune_by": "svd", "svd_allocation": "'"$ALLOC"'",
      "refold_magnitudes": "layer_total", "prune_start": 0.1, "prune_end": 0.7}'
for S in $SEEDS; do
.venv/bin/python benchmarks/finetune_compare.py $RT --lr 3e-3 --methods debora --target-ranks 2 --debora "$SEL" \
    --debora-label "$LABEL" --seed-list $S --json benchmarks/results/${STEM}_debora.json &
.venv/bin/python benchmarks/finetune_compare.py $RT --lr 1e-3 --methods lora-r8 --seed-list $S \
    --json benchmarks/results/${STEM}_lora.json &
wait
done
.venv/bin/python benchmarks/wall_ratio.py "benchmarks/results/${STEM}_debora.json" "benchmarks/results/${STEM}_lora.json" "dEBORA" "LoRA r=8"
