"""benchmarks/variant_paired.py: two dEBORA variants paired by seed (pure function on records, no runs)."""
import importlib.util
import pathlib
import sys

import pytest
from scipy import stats

_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("variant_paired", _DIR / "variant_paired.py")
vp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vp)


def _rec(setting, seed, acc, params=1000, lr=3e-3, method="debora", task="t"):
    return dict(task=task, method=method, setting=setting, seed=seed, acc=acc, adapter_params=params, lr=lr)


def test_rows_pair_the_variants_by_budget_and_seed_with_the_t_interval():
    recs = [_rec("target_rank=1 A", 0, 0.80), _rec("target_rank=1 A", 1, 0.83), _rec("target_rank=1 A", 2, 0.81),
            _rec("target_rank=1 A-dev", 5, 0.90),                      # another label of A (given with |)
            _rec("target_rank=1 B", 0, 0.79), _rec("target_rank=1 B", 1, 0.80), _rec("target_rank=1 B", 2, 0.80),
            _rec("target_rank=1 B", 5, 0.91),
            _rec("target_rank=1 B", 3, 0.50),                           # no A on seed 3: not paired
            _rec("target_rank=1 B", 0, 0.10, lr=1e-2),                  # another lr: ignored
            _rec("r=8", 0, 0.99, method="lora-r8"),                     # not dEBORA: ignored
            _rec("target_rank=2 A", 0, 0.80, params=2000)]              # no B at that budget: no row
    (row,) = vp.rows(recs, "A|A-dev", "B", 3e-3)
    diffs = [1.0, 3.0, 1.0, -1.0]                                       # seeds 0, 1, 2, 5 (points)
    mean = sum(diffs) / 4
    half = stats.t.ppf(0.975, 3) * stats.tstd(diffs) / 2
    assert "| target_rank=1 | 0,1,2,5 |" in row
    assert f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" in row and row.endswith("not separated |")


@pytest.mark.parametrize("b_accs, verdict", [([0.70, 0.71, 0.69], "A above"), ([0.90, 0.91, 0.92], "A below")])
def test_rows_say_which_way_a_separated_difference_goes(b_accs, verdict):
    recs = [_rec("x A", s, 0.80 + 0.01 * s) for s in range(3)] + [_rec("x B", s, a) for s, a in enumerate(b_accs)]
    (row,) = vp.rows(recs, "A", "B", 3e-3)
    assert row.endswith(f"| {verdict} |")


def test_budgets_pair_a_at_one_budget_with_b_at_another():
    recs = [_rec("init_rank=2 A", s, 0.80) for s in range(3)] + [_rec("target_rank=2 B", s, 0.79) for s in range(3)] \
        + [_rec("target_rank=1 B", s, 0.10) for s in range(3)]
    assert vp.rows(recs, "A", "B", 3e-3) == []                          # no shared budget
    (row,) = vp.rows(recs, "A", "B", 3e-3, budgets=("init_rank=2", "target_rank=2"))
    assert "| init_rank=2 vs target_rank=2 | 0,1,2 |" in row and "+1.00" in row
