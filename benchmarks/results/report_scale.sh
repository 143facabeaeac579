#!/bin/bash
# Text at the issue's scale (2,400 examples x 3 epochs): one table, verdicts and plot per lr schedule,
# over every committed scale_rt24_* / scale_tw24_* record of seeds 0-2 (finetune_compare.py --report-only),
# each family at the lr its tune_rt24_* and tune_seeds_rt24_* records chose for that schedule: the best
# mean accuracy over the tuning seeds that all of its lrs share (linear: round 8, seeds 100-102).
# Round 9's seeds 3-5 (*_s345.json, the middle of the Rotten Tomatoes front: dEBORA targets 2 / 4 and
# LoRA r = 2 / 4 only) go to a table of their own, so that every verdict above compares 3 seeds with 3.
# Rounds 12-13 add the six-seed tables of the SVD-cut default (with AdaLoRA: *_svd_rt.md, *_svd_tw.md),
# its fresh-seed table (scale24_linear_s345_svd.md) and Amazon snippets (scale24_linear_amazon.md).
cd "$(dirname "$0")/../.."
tune="$(ls benchmarks/results/tune_rt24_*.json benchmarks/results/tune_seeds_rt24_*.json | paste -sd, -)"
files="/dev/null,$(ls benchmarks/results/scale_rt24_*.json benchmarks/results/scale_tw24_*.json | grep -v '_s345\.json$' | paste -sd, -),$tune"
# the linear verdicts also count the default's rows alone (since round 12 the SVD cut, run with the label
# below, and with a global budget: ", global"); the first dominance line takes the best of every dEBORA
# variant measured. The Rotten Tomatoes six-seed table of rounds 9-11 counts round 9-11's default.
svd_default=(--default-variant "svd cut at s 0.1, sigma2/param, refold total"
             --default-variant "svd cut at s 0.1, sigma2/param, refold total, global")
for sched in constant linear; do
    default=(); [ "$sched" = linear ] && default=("${svd_default[@]}")
    .venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets \
        --lr-schedule "$sched" --json "$files" --out "benchmarks/results/scale24_${sched}.md" \
        --plot-dir "benchmarks/results/scale24_${sched}" "${default[@]}"
done
# exactly the four settings' seeds 0-2 and 3-5 files (a wider glob would take in later variants' records)
six="/dev/null,$(ls benchmarks/results/scale_rt24_lin_debora{2,4}_prune1070{,_s345}.json benchmarks/results/scale_rt24_lin_lora{2,4}{,_s345}.json benchmarks/results/scale_rt24_lin_lora8.json | paste -sd, -),$tune"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes --lr-schedule linear \
    --json "$six" --out benchmarks/results/scale24_linear_6seeds_rt.md --plot-dir benchmarks/results/scale24_linear_6seeds_rt \
    --default-variant "prune 10-70%"
# round 12: the SVD-cut variant (now the default) on fresh seeds 3-5 with LoRA r = 1/2/4/8 on the same seeds,
# pooled with seeds 0-2 (LoRA only; AdaLoRA was re-run on Rotten Tomatoes seeds 3-5 only: its own table below)
svd6="/dev/null,$(ls benchmarks/results/scale_{rt,tw}24_lin_debora{1,2,4}_svds01.json benchmarks/results/scale_{rt,tw}24_lin_debora124_svds01_s345.json \
    benchmarks/results/scale_{rt,tw}24_lin_deboraP41k_svds01g{,_s345}.json \
    benchmarks/results/scale_{rt,tw}24_lin_lora{1,2,4,8}.json benchmarks/results/scale_rt24_lin_lora{2,4}_s345.json \
    benchmarks/results/scale_rt24_lin_lora18_s345.json benchmarks/results/scale_tw24_lin_lora_s345.json 2>/dev/null | paste -sd, -),$tune"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets --lr-schedule linear \
    --json "$svd6" --out benchmarks/results/scale24_linear_6seeds_svd.md --plot-dir benchmarks/results/scale24_linear_6seeds_svd \
    "${svd_default[@]}"
# Rotten Tomatoes over six seeds with AdaLoRA (its seeds 0-2 at the tuned 3e-3, seeds 3-5 run in round 12)
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes --lr-schedule linear \
    --json "$svd6,benchmarks/results/scale_rt24_lin_adalora1.json,benchmarks/results/scale_rt24_lin_adalora2.json,benchmarks/results/scale_rt24_lin_adalora4_lr3e-3.json,benchmarks/results/scale_rt24_lin_adalora12_s345.json,benchmarks/results/scale_rt24_lin_adalora4_s345.json" \
    --out benchmarks/results/scale24_linear_6seeds_svd_rt.md --plot-dir benchmarks/results/scale24_linear_6seeds_svd_rt \
    "${svd_default[@]}"
# tweets' AdaLoRA records at the protocol's 3e-3 (seeds 0-5; target 4's seeds 0-2 sit in an rt24 file)
tw_ada="benchmarks/results/scale_tw24_lin_adalora1.json,benchmarks/results/scale_tw24_lin_adalora2.json,benchmarks/results/scale_rt24_lin_adalora4_lr3e-3.json,benchmarks/results/scale_tw24_lin_adalora124_s345.json"
# tweets over six seeds with AdaLoRA (seeds 0-2 at the tuned 3e-3, seeds 3-5 run in round 13)
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks tweets --lr-schedule linear \
    --json "$svd6,$tw_ada" \
    --out benchmarks/results/scale24_linear_6seeds_svd_tw.md --plot-dir benchmarks/results/scale24_linear_6seeds_svd_tw \
    "${svd_default[@]}"
# ... and with AdaLoRA at 1e-2 instead (its best lr on tweets' seeds 0-2, not the protocol's: a sensitivity view;
# AdaLoRA's tuning records are left out so that the report takes its one lr as given)
tune_noada="$(echo "$tune" | tr , '\n' | grep -v adalora | paste -sd, -)"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks tweets --lr-schedule linear \
    --json "${svd6/$tune/$tune_noada},benchmarks/results/scale_tw24_lin_adalora1_lr1e-2.json,benchmarks/results/scale_tw24_lin_adalora2_lr1e-2.json,benchmarks/results/scale_tw24_lin_adalora4_lr1e-2.json,benchmarks/results/scale_tw24_lin_adalora14_lr1e-2_s345.json,benchmarks/results/scale_tw24_lin_adalora2_lr1e-2_s345.json" \
    --out benchmarks/results/scale24_linear_6seeds_svd_tw_ada1e-2.md --plot-dir benchmarks/results/scale24_linear_6seeds_svd_tw_ada1e-2 \
    "${svd_default[@]}"
# ... and seeds 3-5 alone (fresh seeds: nothing was chosen on them)
svd345="/dev/null,$(ls benchmarks/results/scale_{rt,tw}24_lin_debora124_svds01_s345.json benchmarks/results/scale_{rt,tw}24_lin_deboraP41k_svds01g_s345.json \
    benchmarks/results/scale_rt24_lin_lora{2,4}_s345.json benchmarks/results/scale_rt24_lin_lora18_s345.json \
    benchmarks/results/scale_tw24_lin_lora_s345.json benchmarks/results/scale_rt24_lin_adalora{12,4}_s345.json \
    benchmarks/results/scale_tw24_lin_adalora124_s345.json \
    2>/dev/null | paste -sd, -),$tune"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets --lr-schedule linear \
    --json "$svd345" --out benchmarks/results/scale24_linear_s345_svd.md --plot-dir benchmarks/results/scale24_linear_s345_svd \
    "${svd_default[@]}"
# round 13: a third text task nothing was tuned on (Amazon review snippets, seeds 0-2), every family at the lr
# the protocol chose on Rotten Tomatoes
amz="/dev/null,$(ls benchmarks/results/scale_amz24_*.json | paste -sd, -),$tune"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks amazon --lr-schedule linear \
    --json "$amz" --out benchmarks/results/scale24_linear_amazon.md --plot-dir benchmarks/results/scale24_linear_amazon \
    "${svd_default[@]}"
# round 14: the cut ranked by its first-order loss cost (svd_allocation="taylor", seeds 0-2), against the same
# LoRA / AdaLoRA rows and the round-12 default; its own dominance line, and the two variants paired by seed
# (benchmarks/variant_paired.py): on the development seeds 100-102 (Rotten Tomatoes, where it was chosen
# to go on) and on the report seeds 0-2 (target 1 also 3-5); and the allocation's ablation ("uniform") at
# target 2 (scale24_linear_allocation14.md)
# variant_front NAME LABEL: the variant's records scale_{rt,tw}24_lin_debora124_NAME.json with the default's
# seeds 0-2 and the LoRA / AdaLoRA rows -> scale24_linear_NAME.md, its dominance line for LABEL's rows
variant_front() {
    local files="/dev/null,$(ls benchmarks/results/scale_{rt,tw}24_lin_debora124_$1.json benchmarks/results/scale_{rt,tw}24_lin_debora{1,2,4}_svds01.json \
        benchmarks/results/scale_{rt,tw}24_lin_lora{1,2,4,8}.json benchmarks/results/scale_{rt,tw}24_lin_adalora{1,2}.json \
        benchmarks/results/scale_rt24_lin_adalora4_lr3e-3.json | paste -sd, -),$tune"
    .venv/bin/python benchmarks/finetune_compare.py --report-only --tasks rotten-tomatoes,tweets --lr-schedule linear \
        --json "$files" --out benchmarks/results/scale24_linear_$1.md --plot-dir benchmarks/results/scale24_linear_$1 \
        --default-variant "$2"
}
# paired FILES A [OPTIONS]: variant A paired by seed with the round-12 default (benchmarks/variant_paired.py)
paired() {
    .venv/bin/python benchmarks/variant_paired.py --json "$1" --a "$2" --b "svd cut at s 0.1, sigma2/param, refold total" "${@:3}"
}
variant_front taylor "svd cut at s 0.1, taylor/param, refold total"
{
    echo "# Round 14: the cut's allocation over layers, paired by seed with the round-12 default (sigma2_per_param)"
    echo
    echo "svd_allocation=taylor (the first-order loss cost of each component per parameter):"
    echo
    echo "## Development seeds 100-102 (Rotten Tomatoes)"
    echo
    paired "$(ls benchmarks/results/dev14_*.json benchmarks/results/tune_seeds_rt24_lin_svds01_s*.json | paste -sd, -)" "svd cut taylor"
    echo
    echo "## Report seeds 0-2 (target 1: and 3-5)"
    echo
    paired "$(ls benchmarks/results/scale_{rt,tw}24_lin_debora124_taylor.json \
        benchmarks/results/scale_{rt,tw}24_lin_debora1_taylor_s345.json benchmarks/results/scale_{rt,tw}24_lin_debora124_svds01_s345.json \
        benchmarks/results/scale_{rt,tw}24_lin_debora{1,2,4}_svds01.json | paste -sd, -)" "svd cut at s 0.1, taylor/param, refold total"
    echo
    echo "## The allocation's ablation: svd_allocation=uniform (every layer cut to the same rank) vs the default, report seeds 0-2"
    echo
    paired "$(ls benchmarks/results/scale_{rt,tw}24_lin_debora2_svduniform*.json \
        benchmarks/results/scale_{rt,tw}24_lin_debora2_svds01.json | paste -sd, -)" "svd cut at s 0.1, uniform, refold total"
    echo
    echo "## Without the cut: the same adapter trained at a fixed rank 2 (s held at 0.1, per-component magnitude 1.6 as the default's survivors) vs the default's cut from 8 to 2, report seeds 0-5"
    echo
    paired "$(ls benchmarks/results/scale_{rt,tw}24_lin_debora_r02_fixed*.json \
        benchmarks/results/scale_{rt,tw}24_lin_debora2_svds01.json benchmarks/results/scale_{rt,tw}24_lin_debora124_svds01_s345.json \
        | paste -sd, -)" "fixed r0, s held at 0.1, no cut" --budgets init_rank=2,target_rank=2
} > benchmarks/results/scale24_linear_allocation14.md
# round 15: the cut ranked by its second-order (Optimal Brain Damage) cost under the Kronecker-factored
# Fisher (svd_allocation="fisher", seeds 0-2), against the same LoRA / AdaLoRA rows and the round-12 default,
# with its own dominance line; and the two variants paired by seed on the development seeds 100-102
# (Rotten Tomatoes) and on the report seeds 0-2 (scale24_linear_allocation15.md)
variant_front fisher "svd cut at s 0.1, fisher/param, refold total"
{
    echo "# Round 15: the cut ranked by the K-FAC Fisher (second-order) removal cost, paired by seed with the round-12 default (sigma2_per_param)"
    echo
    echo "## Development seeds 100-102 (Rotten Tomatoes)"
    echo
    paired "$(ls benchmarks/results/dev15_*.json benchmarks/results/dev14_*default*.json benchmarks/results/tune_seeds_rt24_lin_svds01_s*.json | paste -sd, -)" "svd cut fisher"
    echo
    echo "## Report seeds 0-2"
    echo
    paired "$(ls benchmarks/results/scale_{rt,tw}24_lin_debora124_fisher.json \
        benchmarks/results/scale_{rt,tw}24_lin_debora{1,2,4}_svds01.json | paste -sd, -)" "svd cut at s 0.1, fisher/param, refold total"
} > benchmarks/results/scale24_linear_allocation15.md
# round 16: each component's magnitude s learned by the lower AdamW (learn_s) under the default's SVD cut:
# the tweets front of report seeds 0-2 with the same LoRA / AdaLoRA rows (AdaLoRA target 4's tweets records are
# in scale_rt24_lin_adalora4_lr3e-3.json) and its own dominance line
# (scale24_linear_learn_s16.md), and paired by seed with the round-12 default on the Rotten Tomatoes
# development seeds 100-102 and the tweets report seeds 0-2 (scale24_linear_learn_s16_paired.md)
learn_s="svd cut at s 0.1, sigma2/param, refold total, learn s"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks tweets --lr-schedule linear \
    --json "/dev/null,$(ls benchmarks/results/scale16_tw24_learn_s_*.json benchmarks/results/scale_tw24_lin_debora{1,2,4}_svds01.json \
        benchmarks/results/scale_tw24_lin_lora{1,2,4,8}.json benchmarks/results/scale_tw24_lin_adalora{1,2}.json \
        benchmarks/results/scale_rt24_lin_adalora4_lr3e-3.json | paste -sd, -),$tune" \
    --out benchmarks/results/scale24_linear_learn_s16.md --plot-dir benchmarks/results/scale24_linear_learn_s16 \
    --default-variant "$learn_s"
{
    echo "# Round 16: s learned by AdamW (learn_s) under the default's SVD cut, paired by seed with the round-12 default"
    echo
    echo "## Development seeds 100-102 (Rotten Tomatoes)"
    echo
    paired "$(ls benchmarks/results/dev16_*.json benchmarks/results/dev14_*default*.json benchmarks/results/tune_seeds_rt24_lin_svds01_s*.json | paste -sd, -)" "svd cut learn s"
    echo
    echo "## Report seeds 0-2 (tweets)"
    echo
    paired "$(ls benchmarks/results/scale16_tw24_learn_s_*.json benchmarks/results/scale_tw24_lin_debora{1,2,4}_svds01.json | paste -sd, -)" "$learn_s"
} > benchmarks/results/scale24_linear_learn_s16_paired.md
# round 17: the budget's count lowered linearly over the default's 10-70% window instead of cubically
# (prune_schedule="linear": the removals later in the same window), Rotten Tomatoes development seeds 100-102,
# paired by seed with the round-12 default (scale24_linear_schedule17_paired.md)
{
    echo "# Round 17: the linear budget schedule, paired by seed with the round-12 default (cubic)"
    echo
    echo "## Development seeds 100-102 (Rotten Tomatoes)"
    echo
    paired "$(ls benchmarks/results/dev17_*.json benchmarks/results/dev14_*default*.json benchmarks/results/tune_seeds_rt24_lin_svds01_s*.json | paste -sd, -)" "svd cut linear schedule"
} > benchmarks/results/scale24_linear_schedule17_paired.md
# round 18: the top of the text front at LoRA r = 8's size. The default's largest point is target 4 (half of
# LoRA r = 8's adapter); the setting here starts from r0 = 16 (AdaLoRA's habit of starting above the target)
# and cuts to --target-params 331776, LoRA r = 8's adapter count, under a global budget. The six-seed tables
# of round 13 with these rows added: their dominance lines count it as one more dEBORA setting
# (scale24_linear_top18_{rt,tw}.md)
for t in rt tw; do
    task=rotten-tomatoes; [ "$t" = tw ] && task=tweets
    ada="benchmarks/results/scale_rt24_lin_adalora1.json,benchmarks/results/scale_rt24_lin_adalora2.json,benchmarks/results/scale_rt24_lin_adalora4_lr3e-3.json,benchmarks/results/scale_rt24_lin_adalora12_s345.json,benchmarks/results/scale_rt24_lin_adalora4_s345.json"
    [ "$t" = tw ] && ada="$tw_ada"
    .venv/bin/python benchmarks/finetune_compare.py --report-only --tasks "$task" --lr-schedule linear \
        --json "$svd6,$ada,$(ls benchmarks/results/top18_${task}_*.json | paste -sd, -)" \
        --out "benchmarks/results/scale24_linear_top18_$t.md" --plot-dir "benchmarks/results/scale24_linear_top18_$t" \
        "${svd_default[@]}"
done
# ... and Frank-Wolfe on s (--preset bilevel at 3e-3, round 11's default) with the first-order hypergradient
# replaced by warm-started conjugate gradient (3 products per outer iteration), Rotten Tomatoes development
# seeds 100-102 at target 2, paired with the same preset's first-order rows of round 8 ("prune 10-70%") and with
# seed 100's first-order run re-done on round 18's code (scale24_linear_cg18_paired.md)
{
    echo "# Round 18: the bilevel preset with a warm-started CG hypergradient, paired by seed with its first-order rows"
    echo
    echo "## Development seeds 100-102 (Rotten Tomatoes), first-order rows of round 8"
    echo
    .venv/bin/python benchmarks/variant_paired.py --a "bilevel, warm-started cg" --b "prune 10-70%" --lr 0.003 \
        --json "$(ls benchmarks/results/dev18_cg_*.json benchmarks/results/tune_seeds_rt24_lin_debora_prune1070_{a,b}.json | paste -sd, -)"
    echo
    echo "## The first-order row of seed 100 re-run on round 18's code"
    echo
    .venv/bin/python benchmarks/variant_paired.py --a "bilevel, warm-started cg" --b "prune 10-70%" --lr 0.003 \
        --json "$(ls benchmarks/results/dev18_*.json | paste -sd, -)"
} > benchmarks/results/scale24_linear_cg18_paired.md
# round 19: the default's oblique bases started along each weight's leading (init_bases="principal", PiSSA's)
# or trailing ("minor", MiLoRA's) singular vectors instead of random ones, Rotten Tomatoes development seeds
# 100-102, paired by seed with the round-12 default (scale24_linear_init_bases19_paired.md)
{
    echo "# Round 19: the default from singular-vector bases (init_bases), paired by seed with the round-12 default (random bases)"
    for d in principal minor; do
        echo
        echo "## init_bases=$d, development seeds 100-102 (Rotten Tomatoes)"
        echo
        paired "$(ls benchmarks/results/dev19_${d}_*.json benchmarks/results/dev14_*default*.json benchmarks/results/tune_seeds_rt24_lin_svds01_s*.json | paste -sd, -)" "svd cut $d"
    done
} > benchmarks/results/scale24_linear_init_bases19_paired.md
# round 21 (pre-registered before any of its results): tweets' one undominated point, LoRA r = 8, and the
# default's target 4 (the front's best point at no more parameters over six seeds) on seeds 6-11 too, same
# commands and lrs (r21_tw_{lora8,debora_t4}_sN.json). The six-seed tweets table with them added
# (scale24_linear_tw21_12seeds.md: these two rows over twelve seeds, the others over six) and the two alone
# (scale24_linear_tw21_r8_vs_t4.md: the paired line is the pre-registered comparison)
tw21="$(ls benchmarks/results/r21_tw_lora8_s*.json benchmarks/results/r21_tw_debora_t4_s*.json | paste -sd, -)"
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks tweets --lr-schedule linear \
    --json "$svd6,$tw_ada,$tw21" --out benchmarks/results/scale24_linear_tw21_12seeds.md \
    --plot-dir benchmarks/results/scale24_linear_tw21_12seeds "${svd_default[@]}"
two=$(mktemp --suffix=.json)
.venv/bin/python - "$two" "$svd6,$tw21" <<'PY'
import json, sys
recs = [r for f in sys.argv[2].split(",") if f != "/dev/null" for r in json.load(open(f))
        if r.get("phase") == "tune" or (r["task"] == "tweets" and r["setting"] in
                                        ("r=8", "target_rank=4 svd cut at s 0.1, sigma2/param, refold total"))]
json.dump(recs, open(sys.argv[1], "w"))
PY
.venv/bin/python benchmarks/finetune_compare.py --report-only --tasks tweets --lr-schedule linear \
    --json "/dev/null,$two" --out benchmarks/results/scale24_linear_tw21_r8_vs_t4.md \
    --plot-dir benchmarks/results/scale24_linear_tw21_r8_vs_t4 "${svd_default[@]}"
rm -f "$two"
