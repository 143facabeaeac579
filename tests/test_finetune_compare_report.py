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
