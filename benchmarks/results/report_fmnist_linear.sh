#!/bin/bash
# Fashion-MNIST with the linear lr schedule (round 10): one table, verdicts and plot over every committed
# record of the linear-schedule campaigns (rounds 6, 9, 10, 11), each family and variant at the lr its own
# tuning records chose on seeds 100-102 (round 10: fronts_fmnist10_lin_*.json hold tuning and report rows);
# a variant with reports at one lr and no tuning counts as "untuned". The verdict adds a dominance line for
# the rows of the image preset alone (oblique-svd, what `debora train` uses on images since round 11; the
# text default's rows, 'prune 10-70%', dominate 0 of 4 here).
cd "$(dirname "$0")/../.."
# front NAME FILES [ARGS...]: the table, verdicts and front PNG of the records in FILES (comma-separated) ->
# benchmarks/results/NAME.md and benchmarks/results/NAME/ (finetune_compare.py --report-only; ARGS passed on)
front() {
    local name=$1 files=$2
    shift 2
    .venv/bin/python benchmarks/finetune_compare.py --report-only --tasks fashion-mnist --lr-schedule linear \
        --json "$files" --out "benchmarks/results/$name.md" --plot-dir "benchmarks/results/$name" "$@"
}
files="/dev/null,$(ls benchmarks/results/fronts_fmnist11_*.json benchmarks/results/fronts_fmnist10_*.json benchmarks/results/fronts_fmnist6_lin_*.json \
    benchmarks/results/fronts_fmnist9_lin_*.json | grep -v '_s345_' | paste -sd, -)"
front fmnist10_linear "$files" \
    --default-variant "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param"
# round 11: fresh seeds 3-5 for LoRA and the oblique-svd settings (the variant was chosen on seeds 0-2),
# pooled with their seeds 0-2: a six-seed table of exactly those settings (lrs from the same tuning records)
# preset_records OUT [GLOB...]: round 11's six-seed records (LoRA, exactly the oblique-svd settings below, and
# both families' tuning rows for the lrs) plus every record of the files matching GLOB -> OUT (one JSON list)
preset_records() {
    local out=$1
    shift
    .venv/bin/python - "$out" "$@" <<'PY'
import glob, json, sys
keep = tuple(f"{s} oblique s1 r0=8, svd cut 10-70%, refold" for s in (
    "target_params=22784", "target_params=45568", "target_params=60757", "target_params=91136",
    "target_params=182272", "target_rank=1", "target_rank=2", "target_rank=4"))
files = ["benchmarks/results/fronts_fmnist10_lin_lora.json", "benchmarks/results/fronts_fmnist11_tune_svd8_s2pp.json",
         *sorted(glob.glob("benchmarks/results/fronts_fmnist11_s345_*.json")),
         *sorted(glob.glob("benchmarks/results/fronts_fmnist11_svd8_s2pp1070*.json")),
         *[f for g in sys.argv[2:] for f in sorted(glob.glob(g))]]
recs = [r for f in files for r in json.load(open(f))
        if r["method"] != "debora" or r.get("phase") == "tune" or r["setting"].startswith(keep)]
json.dump(recs, open(sys.argv[1], "w"))
PY
}
six=$(mktemp --suffix=.json)
preset_records "$six"
front fmnist11_6seeds "$six" \
    --default-variant "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param"
rm -f "$six"
# dev_paired A FILES: variant A (its records: FILES, comma-separated) paired by seed with the preset's
# development rows on the tuning seeds 100-102 (benchmarks/variant_paired.py)
dev_paired() {
    .venv/bin/python benchmarks/variant_paired.py --a "$1" --b "oblique-svd r0=8" --json \
        "$2,benchmarks/results/fronts_fmnist14_dev_default.json,benchmarks/results/fronts_fmnist13_dev_r08.json"
}
# round 14: the cut ranked by its first-order loss cost (svd_allocation="taylor") in the image preset, on the
# tuning seeds 100-102, paired with the preset (sigma2_per_param) at the same budgets. fronts_fmnist14_dev_taylor.json
# was run before the gradient pass put BatchNorm on batch statistics (running estimates then); the code now
# does what fronts_fmnist14_dev_taylor_bn.json measured
{
    echo "# Fashion-MNIST: svd_allocation=taylor vs the oblique-svd preset, tuning seeds 100-102, paired by seed"
    echo
    for a in "oblique-svd r0=8, taylor, BN batch stats" "oblique-svd r0=8, taylor"; do
        dev_paired "$a" "benchmarks/results/fronts_fmnist14_dev_taylor_bn.json,benchmarks/results/fronts_fmnist14_dev_taylor.json"
        echo
    done
} > benchmarks/results/fmnist14_taylor_paired.md
# round 15: the cut ranked by its second-order cost under the Kronecker-factored Fisher (svd_allocation="fisher")
# in the image preset: on the tuning seeds 100-102 against the preset's development rows, then on the report
# seeds 0-5 against the preset's six-seed rows (fronts_fmnist11_svd8_s2pp1070_p{1,}.json, fronts_fmnist11_s345_oblsvd.json)
{
    echo "# Fashion-MNIST: svd_allocation=fisher vs the oblique-svd preset, paired by seed"
    echo
    echo "## Development seeds 100-102"
    echo
    dev_paired "oblique-svd r0=8, fisher" "$(ls benchmarks/results/fronts_fmnist15_dev_fisher_*.json | paste -sd, -)"
    echo
    echo "## Report seeds 0-5"
    echo
    .venv/bin/python benchmarks/variant_paired.py --a "oblique-svd r0=8, fisher" \
        --b "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param" --json \
        "$(ls benchmarks/results/fronts_fmnist15_fisher_*.json | paste -sd, -),benchmarks/results/fronts_fmnist11_svd8_s2pp1070_p1.json,benchmarks/results/fronts_fmnist11_svd8_s2pp1070_p.json,benchmarks/results/fronts_fmnist11_s345_oblsvd.json"
} > benchmarks/results/fmnist15_fisher_paired.md
# round 15: the cut's window on images, later than the preset's 10-70% (round 13 found an earlier one worse):
# 10-90% and 30-90%; and the survivors' magnitude after a cut, init_s (1) instead of their layer's initial total
# (layer_total); tuning seeds 100-102, paired with the preset's development rows
{
    echo "# Fashion-MNIST: the oblique-svd preset with a later cut window or survivors refolded to init_s, tuning seeds 100-102, paired by seed"
    echo
    for a in "oblique-svd r0=8, cut 0.1-0.9" "oblique-svd r0=8, cut 0.3-0.9" "oblique-svd r0=8, refold init_s"; do
        dev_paired "$a" "$(ls benchmarks/results/fronts_fmnist15_dev_window_*.json benchmarks/results/fronts_fmnist15_dev_refold_*.json | paste -sd, -)"
        echo
    done
} > benchmarks/results/fmnist15_window_paired.md
# round 16: the image preset with each component's magnitude s learned by the lower AdamW (learn_s), tuning
# seeds 100-102, paired with the preset's development rows
{
    echo "# Fashion-MNIST: the oblique-svd preset with s learned by AdamW (learn_s), tuning seeds 100-102, paired by seed"
    echo
    dev_paired "oblique-svd r0=8, learn s" "$(ls benchmarks/results/fronts_fmnist16_dev_learn_s_*.json | paste -sd, -)"
} > benchmarks/results/fmnist16_learn_s_paired.md
# round 17: the image preset with its budget lowered linearly over 10-70% instead of cubically
# (prune_schedule="linear"), tuning seeds 100-102, paired with the preset's development rows
{
    echo "# Fashion-MNIST: the oblique-svd preset with the linear budget schedule, tuning seeds 100-102, paired by seed"
    echo
    dev_paired "oblique-svd r0=8, linear schedule" "$(ls benchmarks/results/fronts_fmnist17_dev_linear_schedule_*.json | paste -sd, -)"
} > benchmarks/results/fmnist17_schedule_paired.md
# round 18: the image front at LoRA r = 1's size, tuning seeds 100-102. The held magnitude around the preset's
# (init_s 0.5 / 2 instead of 1) and s learned in log space (learn_log_s), paired with the preset's development
# rows; and the preset below LoRA r = 1's size (target_params 17,088 and 11,392: 3/4 and 1/2 of it) beside its
# development rows at 22,784 and 45,568
{
    echo "# Fashion-MNIST at LoRA r = 1's size: the held magnitude and a learned one in log space, tuning seeds 100-102, paired by seed"
    echo
    for a in "oblique-svd r0=8, init_s 0.5" "oblique-svd r0=8, init_s 2"; do
        dev_paired "$a" "$(ls benchmarks/results/fronts_fmnist18_dev_init_s*.json | paste -sd, -)"
        echo
    done
    dev_paired "oblique-svd r0=8, learn log s" "$(ls benchmarks/results/fronts_fmnist18_dev_learn_log_s_*.json | paste -sd, -)"
} > benchmarks/results/fmnist18_magnitude_paired.md
front fmnist18_below_r1 \
    "/dev/null,$(ls benchmarks/results/fronts_fmnist18_dev_P*.json | paste -sd, -),benchmarks/results/fronts_fmnist13_dev_r08.json,benchmarks/results/fronts_fmnist14_dev_default.json"
# round 19: the oblique bases started along each convolution's leading (init_bases="principal", PiSSA's) or
# trailing ("minor", MiLoRA's) singular vectors instead of random ones, tuning seeds 100-102, paired with the
# preset's development rows
{
    echo "# Fashion-MNIST: the oblique-svd preset from singular-vector bases (init_bases), tuning seeds 100-102, paired by seed"
    echo
    for d in principal minor; do
        dev_paired "oblique-svd r0=8, init $d" "$(ls benchmarks/results/fronts_fmnist19_dev_init_${d}_*.json | paste -sd, -)"
        echo
    done
} > benchmarks/results/fmnist19_init_bases_paired.md
# round 19: four times the issue's training pool (9,600 examples, 3 epochs, report seeds 0-2), the image preset
# at LoRA r = 1/2/4/8's sizes beside LoRA, every method at the lr the issue-scale tuning chose (3e-3; not re-tuned
# at this scale)
front fmnist19_x4 \
    "/dev/null,benchmarks/results/scale19_fmnist_x4_lora.json,benchmarks/results/scale19_fmnist_x4_debora.json"
# round 20: at 4x the data, s learned in log space (learn_log_s) against the held s = 1 of the preset, at LoRA
# r = 4 / 8's sizes on the tuning seeds 100-102, paired by seed, with LoRA r = 4 / 8 on the same seeds beside them;
# the lr protocol re-run at this scale (grid 1e-3 / 3e-3 / 1e-2, tuning seeds 100-102, middle setting of each family:
# r20x4_tune_*.json); and seeds 3-5 added to round 19's seeds 0-2 for every family (a six-seed table at 4x the data)
{
    echo "# Fashion-MNIST at 4x the data (9,600 x 3): s learned in log space vs the preset's held s, tuning seeds 100-102, paired by seed"
    echo
    .venv/bin/python benchmarks/variant_paired.py --a "learn log s" --b "oblique-svd r0=8" \
        --json "$(ls benchmarks/results/r20x4_dev_*.json | paste -sd, -)"
} > benchmarks/results/fmnist20_x4_learn_log_s_paired.md
front fmnist20_x4_dev \
    "/dev/null,$(ls benchmarks/results/r20x4_dev_*.json benchmarks/results/r20x4_tune_*.json | paste -sd, -)"
front fmnist20_x4_6seeds \
    "/dev/null,benchmarks/results/scale19_fmnist_x4_lora.json,benchmarks/results/scale19_fmnist_x4_debora.json,$(ls benchmarks/results/scale20_fmnist_x4_*.json benchmarks/results/r20x4_tune_*.json | paste -sd, -)"
# round 21 (pre-registered before any of its results): seeds 6-11 added to round 11's six-seed front, every
# setting of it with the same commands and lrs (r21_fm_{lora,oblsvd_P,oblsvd_T}_sN.json), a twelve-seed table; and
# what the cut contributes: the same oblique adapter trained at the final rank from the start (fixed-oblique,
# init_rank 1/2/4/8, s held at 1, no cut; seeds 0-11, r21_fm_fixedobl_sN.json) paired by seed with the preset's
# budget at that LoRA rank's size
twelve=$(mktemp --suffix=.json)
r21_fm=("benchmarks/results/r21_fm_lora_s*.json" "benchmarks/results/r21_fm_oblsvd_[PT]_s*.json")   # seeds 6-11
preset_records "$twelve" "${r21_fm[@]}"
front fmnist21_12seeds "$twelve" \
    --default-variant "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param"
# ... and seeds 6-11 alone (nothing was chosen on them; the tuning rows only for the lrs)
fresh=$(mktemp --suffix=.json)
.venv/bin/python - "$fresh" "${r21_fm[@]}" <<'PY'
import glob, json, sys
files = ["benchmarks/results/fronts_fmnist10_lin_lora.json", "benchmarks/results/fronts_fmnist11_tune_svd8_s2pp.json"]
recs = [r for f in files for r in json.load(open(f)) if r.get("phase") == "tune"]
recs += [r for f in sorted(f for g in sys.argv[2:] for f in glob.glob(g)) for r in json.load(open(f))]
json.dump(recs, open(sys.argv[1], "w"))
PY
front fmnist21_s6to11 "$fresh" --default-variant "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param"
rm -f "$fresh"
{
    echo "# Fashion-MNIST: the image preset (train at r0 = 8, cut to the budget) minus the same oblique adapter trained at the final rank (fixed-oblique, no cut), paired by seed"
    echo
    echo "Seeds 0-11 (2,400 x 3, 2,000 held out, lr 3e-3 linear for both); the budget at each LoRA rank's adapter count against init_rank = that rank."
    echo
    for r in "22784,1" "45568,2" "91136,4" "182272,8"; do
        .venv/bin/python benchmarks/variant_paired.py --a "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param" \
            --b "fixed-oblique" --budgets "target_params=${r%,*},init_rank=${r#*,}" \
            --json "$twelve,$(ls benchmarks/results/r21_fm_fixedobl_s*.json | paste -sd, -)" | { [ "$r" = "22784,1" ] && cat || tail -n +5; }
    done
} > benchmarks/results/fmnist21_cut_vs_fixed_paired.md
# round 21, C (written down after B): a wider start, r0 = 16 cut to the same two small budgets, on the development
# seeds 100-102 against the preset's development rows, then on seeds 0-11 against its twelve-seed rows
{
    echo "# Fashion-MNIST: the image preset from r0 = 16 instead of 8, paired by seed"
    echo
    echo "## Development seeds 100-102"
    echo
    dev_paired "oblique-svd r0=16" "$(ls benchmarks/results/r21_fm_dev_r016_s*.json | paste -sd, -)"
    echo
    echo "## Report seeds 0-11"
    echo
    .venv/bin/python benchmarks/variant_paired.py --a "oblique-svd r0=16" \
        --b "oblique s1 r0=8, svd cut 10-70%, refold total, sigma2/param" \
        --json "$twelve,$(ls benchmarks/results/r21_fm_r016_s*.json | paste -sd, -)"
} > benchmarks/results/fmnist21_r016_paired.md
rm -f "$twelve"
