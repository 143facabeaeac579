"""The verdict arithmetic of benchmarks/finetune_compare.py (pure functions on records, no runs)."""
import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_compare.py"
_spec = importlib.util.spec_from_file_location("finetune_compare", _PATH)
fc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fc)


def _recs(method, setting, accs, params, wall=100.0):
    return [dict(task="t", method=method, setting=setting, seed=i, acc=a, params=params,
                 adapter_params=params - 10, wall=wall, lr=1e-3) for i, a in enumerate(accs)]


def test_front_at_takes_the_most_accurate_point_that_is_not_larger():
    deb = {("debora", "a"): _recs("debora", "a", [0.80, 0.82], 1000),
           ("debora", "b"): _recs("debora", "b", [0.70, 0.70], 1900),     # nearest in size, worse
           ("debora", "c"): _recs("debora", "c", [0.95, 0.95], 2100)}     # larger than the rival
    (key, _), how = fc.front_at(deb, 2000)
    assert key == ("debora", "a") and how == "best with no more params"
    (key, _), how = fc.front_at(deb, 900)                                 # every point is larger
    assert key == ("debora", "a") and how == "nearest size, larger"


@pytest.mark.parametrize("ada_acc, sign", [(0.805, "≥"), (0.815, "<")])
def test_adalora_line_reads_the_front_at_adaloras_size(ada_acc, sign):
    g = {("lora-r8", "r=8"): _recs("lora-r8", "r=8", [0.80, 0.82], 8000),
         ("adalora", "target_r=2"): _recs("adalora", "target_r=2", [ada_acc] * 2, 2000),
         ("debora", "target_rank=1"): _recs("debora", "target_rank=1", [0.80, 0.82], 1000),
         ("debora", "init_rank=2 x"): _recs("debora", "init_rank=2 x", [0.60, 0.60], 1990)}
    lines = fc._verdict_lines(g, "t", "test")
    line = next(l for l in lines if "vs AdaLoRA" in l)
    assert "dEBORA target_rank=1 81.00%" in line and f"→ {sign} AdaLoRA" in line
    assert "criterion 1 MET" in lines[0]          # 81.00% at 990 ≤ 7990 / 3 adapter params


def test_dominance_by_the_default_alone_counts_only_the_default_rows():
    g = {("lora-r8", "r=8"): _recs("lora-r8", "r=8", [0.80, 0.82], 8000),
         ("lora-r2", "r=2"): _recs("lora-r2", "r=2", [0.78, 0.78], 2000),
         ("debora", "target_rank=2 prune 10-70%"): _recs("debora", "target_rank=2 prune 10-70%", [0.77] * 2, 1900),
         ("debora", "target_rank=2 other"): _recs("debora", "target_rank=2 other", [0.79] * 2, 1900)}
    lines = fc._verdict_lines(g, "t", "test", default_variant="prune 10-70%")
    any_line = next(l for l in lines if "dominance:" in l)
    own_line = next(l for l in lines if "dominance by the default alone" in l)
    assert "1 of 2" in any_line and "any of 2 settings" in any_line and "lora-r2 r=2" in any_line
    assert own_line.endswith(": 0 of 2") and "target_rank=2 prune 10-70%" in own_line
    assert not any("default alone" in l for l in fc._verdict_lines(g, "t", "test"))


def test_dominance_by_the_default_alone_takes_several_labels():
    """The default's rows under a user budget knob (e.g. ', global') are the default too; others are not."""
    g = {("lora-r8", "r=8"): _recs("lora-r8", "r=8", [0.80, 0.82], 8000),
         ("lora-r1", "r=1"): _recs("lora-r1", "r=1", [0.75, 0.75], 1000),
         ("lora-r2", "r=2"): _recs("lora-r2", "r=2", [0.78, 0.78], 2000),
         ("debora", "target_rank=2 cut"): _recs("debora", "target_rank=2 cut", [0.79] * 2, 1900),
         ("debora", "target_params=990 cut, global"): _recs("debora", "target_params=990 cut, global",
                                                             [0.76] * 2, 990),
         ("debora", "target_rank=1 other"): _recs("debora", "target_rank=1 other", [0.99] * 2, 500)}
    lines = fc._verdict_lines(g, "t", "test", default_variant=["cut", "cut, global"])
    own_line = next(l for l in lines if "dominance by the default alone" in l)
    assert own_line.endswith(": 2 of 3 (lora-r1 r=1, lora-r2 r=2)")
    assert "'cut' / 'cut, global' rows" in own_line and "other" not in own_line


def _tune(method, setting, lr, accs, seeds=(100, 101, 102)):
    return [dict(task="t", method=method, setting=setting, seed=s, acc=a, lr=lr, phase="tune")
            for s, a in zip(seeds, accs)]


def test_tuned_lr_is_the_best_mean_over_tuning_seeds_not_the_best_single_run():
    recs = (_tune("debora", "target_rank=2", 3e-3, [0.812, 0.804, 0.832])      # mean 0.816
            + _tune("debora", "target_rank=2", 1e-2, [0.811, 0.811, 0.820])    # mean 0.814
            + _tune("adalora", "target_r=2", 3e-3, [0.804, 0.788, 0.831])      # best seed-100 run...
            + _tune("adalora", "target_r=2", 1e-2, [0.807, 0.801, 0.814]))     # ...is 1e-2's
    picks = fc.tuned_lrs(recs)
    assert picks[("t", "debora", "")] == 3e-3
    assert picks[("t", "adalora", "")] == 3e-3
    one_seed = [r for r in recs if r["seed"] == 100]                           # the old protocol
    assert fc.tuned_lrs(one_seed)[("t", "adalora", "")] == 1e-2
    lucky = (_tune("debora", "target_rank=2", 3e-3, [0.812, 0.804, 0.822])    # the best single run,
             + _tune("debora", "target_rank=2", 1e-2, [0.811, 0.815, 0.820]))  # the better mean
    assert fc.tuned_lrs(lucky)[("t", "debora", "")] == 1e-2
    scores = fc.tuning_scores(recs, "t", "adalora")
    assert scores[1e-2][1] == [100, 101, 102] and abs(scores[3e-3][0] - 0.80767) < 1e-4


def test_an_lr_stopped_by_the_race_cannot_be_picked_and_ties_go_to_the_smaller_lr():
    recs = (_tune("lora-r4", "r=4", 1e-3, [0.80, 0.70, 0.70])
            + _tune("lora-r4", "r=4", 3e-3, [0.99], seeds=(100,)))   # one lucky seed, not repeated
    assert fc.tuned_lrs(recs)[("t", "lora", "")] == 1e-3
    assert fc.tuning_scores(recs, "t", "lora")[3e-3] == (0.99, [100])
    tie = _tune("lora-r4", "r=4", 1e-3, [0.8, 0.8, 0.8]) + _tune("lora-r4", "r=4", 3e-4, [0.8, 0.8, 0.8])
    assert fc.tuned_lrs(tie)[("t", "lora", "")] == 3e-4
    disjoint = (_tune("lora-r4", "r=4", 1e-3, [0.8], seeds=(100,))     # two manual runs, no common
                + _tune("lora-r4", "r=4", 3e-3, [0.9], seeds=(101,)))   # seed: no pick, no crash
    assert ("t", "lora", "") not in fc.tuned_lrs(disjoint)


def test_the_race_repeats_only_the_lrs_close_to_the_first_seeds_best_and_the_report_uses_the_best_mean(
        tmp_path, monkeypatch):
    ran = []
    acc = {100: {1e-3: 0.72, 3e-3: 0.80, 1e-2: 0.81, 3e-2: 0.50},      # 1e-2 wins on seed 100 alone
           101: {1e-3: 0.70, 3e-3: 0.83, 1e-2: 0.80}}

    def fake_run(spec, records, path, written):
        ran.append((spec["phase"], spec["seed"], spec["lr"]))
        a = acc[spec["seed"]][spec["lr"]] if spec["phase"] == "tune" else 0.8
        rec = dict(task=spec["task"], method=spec["method"], setting=spec["setting"], seed=spec["seed"],
                   phase=spec["phase"], lr=spec["lr"], acc=a, params=1, adapter_params=1, wall=1.0,
                   lr_schedule="constant", warmup=0.0)
        records.append(rec)
        return rec

    monkeypatch.setattr(fc, "_run", fake_run)
    monkeypatch.setattr(fc, "plot_fronts", lambda records, tasks, plot_dir: [])
    assert fc.main(["--tasks", "rotten-tomatoes", "--methods", "adalora", "--adalora-target-rs", "2",
                    "--lr-grid", "1e-3,3e-3,1e-2,3e-2", "--tune-seeds", "100,101", "--seed-list", "0",
                    "--json", str(tmp_path / "t.json"), "--out", str(tmp_path / "o.md")]) == 0
    assert sorted(ran) == sorted([("tune", 100, 1e-3), ("tune", 100, 3e-3), ("tune", 100, 1e-2),
                                  ("tune", 100, 3e-2),                   # 31 points behind: not repeated
                                  ("tune", 101, 1e-3), ("tune", 101, 3e-3), ("tune", 101, 1e-2),
                                  ("report", 0, 3e-3)])                  # best mean: 81.5 vs 80.5


def test_paired_by_seed_is_the_student_t_interval_of_the_seed_differences():
    """diffs 1 / 2 / 3 points: mean 2, sd 1, t(0.975, 2) = 4.302653 -> 2 -+ 4.302653 / sqrt(3)."""
    deb = [dict(seed=s, acc=a) for s, a in ((0, 0.81), (1, 0.82), (2, 0.83), (9, 0.99))]
    lora = [dict(seed=s, acc=a) for s, a in ((0, 0.80), (1, 0.80), (2, 0.80), (5, 0.10))]
    seeds, diffs, mean, (lo, hi) = fc.paired_by_seed(deb, lora)
    assert seeds == [0, 1, 2] and diffs == pytest.approx([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert lo == pytest.approx(2 - 4.302653 / 3 ** 0.5, abs=1e-5)
    assert hi == pytest.approx(2 + 4.302653 / 3 ** 0.5, abs=1e-5)
    assert fc.paired_by_seed(deb[:1], lora)[3] is None            # one shared seed: no interval


def test_paired_line_pairs_each_rival_with_the_front_at_its_size():
    g = {("lora-r8", "r=8"): _recs("lora-r8", "r=8", [0.80, 0.82, 0.81], 8000),
         ("debora", "target_rank=1"): _recs("debora", "target_rank=1", [0.81, 0.83, 0.82], 1000),
         ("debora", "target_rank=8"): _recs("debora", "target_rank=8", [0.70, 0.70, 0.70], 9000)}
    line = next(l for l in fc._verdict_lines(g, "t", "test") if "paired by seed vs lora-r8" in l)
    assert "dEBORA target_rank=1 (best with no more params) +1.00 points" in line
    assert "95% CI [+1.00, +1.00]" in line and line.endswith("→ dEBORA above")
