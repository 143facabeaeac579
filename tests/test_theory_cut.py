"""theory_checks/checks/cut.py (the default's SVD cut against exact removal costs) on the toy, float64."""
import math

import pytest
import torch

from theory_checks import criteria as CR
from theory_checks.checks import cut
from theory_checks.study import Study


@pytest.fixture(scope="module")
def toy_study():
    (factory, cfg), = cut.instances("toy")
    st = Study(factory(), cfg, log=lambda *a: None)
    cut.run(st)
    return st


def test_the_check_models_the_default():
    from debora.train import TrainConfig
    d = TrainConfig()
    assert cut.PRESET["init_s"] == d.init_s and cut.PRESET["basis"] == d.basis
    assert cut.PRESET["init_rank"] == d.init_rank and cut.PRESET["target_rank"] == d.target_rank


def test_folding_the_start_keeps_the_pretrained_function():
    """After fold_start the adapted model at its start computes W0's function (ΔW0 moved into the base)."""
    (factory, _), = cut.instances("toy")
    ap = factory()
    W0 = {n: w.clone() for n, w in ap.frozen.items()}
    d0 = cut.fold_start(ap)
    assert any(float(v.abs().max()) > 0.1 for v in d0.values())
    head = ap.head_of(ap.y_init)
    zero = {n: torch.zeros_like(w) for n, w in W0.items()}
    ap_loss_start = float(ap.task_loss(ap.x0, ap.y_init, ap.D2))
    with torch.no_grad():
        frozen, ap.frozen = ap.frozen, W0
        plain = float(ap.loss_of_deltas(zero, head, ap.D2))
        ap.frozen = frozen
    assert ap_loss_start == pytest.approx(plain, rel=1e-12)


def test_second_order_taylor_is_exact_on_the_quadratic_toy(toy_study):
    """The toy's loss is quadratic in ΔW, so f(Ψ − σuvᵀ) − f(Ψ) = −σ⟨∇f, uvᵀ⟩ + ½σ²⟨uvᵀ, H uvᵀ⟩ exactly:
    the gradient, the HVP and the removals agree to float64 rounding."""
    comps = toy_study.plots["cut"]["components"]
    scale = max(abs(c["exact"]) for c in comps)
    for c in comps:
        assert c["taylor2"] == pytest.approx(c["exact"], abs=1e-9 * scale)
    assert toy_study.plots["cut"]["keys"]["second-order Taylor"]["rho"] == pytest.approx(1.0)


def test_the_toy_cut_keeps_the_two_planted_directions(toy_study):
    """The toy's target is rank 2: cutting to 2 components by σ²/param costs what the exact-ranked cut
    costs, and far less than a random cut."""
    c = toy_study.plots["cut"]
    assert c["k"] == 2 and c["n_components"] == cut.PRESET["init_rank"]
    assert c["keys"]["σ²/param (default)"]["ratio"] == pytest.approx(1.0)
    assert c["random_increase"] > 10 * abs(c["oracle_increase"])
    rows = [r for r in toy_study.rows if "loss increase" in r["quantity"] and "default" in r["quantity"]]
    assert rows and rows[0]["verdict"] == CR.HOLDS


def test_cut_by_keeps_every_layers_best_then_the_global_best():
    comps = [("a", 0, 3.0, None, None, 1), ("a", 1, 2.0, None, None, 1), ("b", 0, 0.1, None, None, 1),
             ("b", 1, 0.05, None, None, 1), ("a", 2, 1.0, None, None, 1)]
    key = [3.0, 2.0, 0.1, 0.05, 1.0]
    assert cut.cut_by(comps, key, 2) == [True, False, True, False, False]
    assert cut.cut_by(comps, key, 3) == [True, True, True, False, False]
    assert cut.cut_by(comps, key, 1) == [True, False, True, False, False]   # one per layer stays


def test_verdicts_follow_the_fixed_criteria():
    assert cut.rho_verdict(CR.CUT_RHO_HOLDS) == CR.HOLDS
    assert cut.rho_verdict(CR.CUT_RHO_FAILS - 1e-9) == CR.FAILS
    assert cut.rho_verdict(math.nan) == CR.INCONCLUSIVE
    assert cut.loss_verdict(CR.CUT_LOSS_HOLDS) == CR.HOLDS
    assert cut.loss_verdict(CR.CUT_LOSS_FAILS + 1e-9) == CR.FAILS
    assert cut.loss_verdict(0.5 * (CR.CUT_LOSS_HOLDS + CR.CUT_LOSS_FAILS)) == CR.INCONCLUSIVE
