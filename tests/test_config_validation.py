"""Every TrainConfig field is coerced by its type and checked: numbers finite and in range, errors
naming the field; YAML spellings such as ``lr: 1e-3`` work."""
from __future__ import annotations

import math
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from debora.train import TrainConfig, load_config
from debora.train.config_checks import _kind

HINTS = typing.get_type_hints(TrainConfig)
FLOAT_FIELDS = sorted(n for n, h in HINTS.items() if _kind(h)[0] in ("float", "number"))
INT_FIELDS = sorted(n for n, h in HINTS.items() if _kind(h)[0] == "int")


def test_the_float_fields_are_found():
    assert {"lr", "head_lr", "epochs", "tau", "eps", "alpha", "weight_decay", "fw_lipschitz",
            "gap_tol", "truncate_from"} <= set(FLOAT_FIELDS)
    assert {"batch_size", "seed", "init_rank", "max_iterations"} <= set(INT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "nan", "inf"])
def test_non_finite_numbers_are_refused_naming_the_field(name, bad):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        TrainConfig(**{name: bad})


@pytest.mark.parametrize("kw, match", [
    ({"head_lr": -1.0}, "head_lr must be > 0"), ({"head_lr": 0.0}, "head_lr must be > 0"),
    ({"lr": 0.0}, "lr must be > 0"), ({"lr": -1e-3}, "lr must be > 0"),
    ({"alpha": 0.0}, "alpha must be > 0"), ({"seed": -1}, "seed must be >= 0"),
    ({"epochs": 1e9}, "epochs must be <= 1e\\+06"), ({"max_eval_examples": 0}, "max_eval_examples"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"dropout": 1.0}, "dropout"),
    ({"estimator_options": {"damping": float("nan")}}, "estimator_options\\['damping'\\] must be finite"),
])
def test_out_of_range_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    ({"lr": "fast"}, "lr must be a number, got the string 'fast'"),
    ({"lr": [1e-3]}, "lr must be a number"),
    ({"batch_size": True}, "batch_size must be an integer, got True"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"epochs": None}, "epochs must not be None"),
    ({"plots": "maybe"}, "plots must be true or false"),
    ({"dataset": 3}, "dataset must be a string"),
    ({"target_modules": [1, 2]}, "target_modules must be a list of module names"),
    ({"estimator_options": [1]}, "estimator_options must be a mapping"),
])
def test_wrong_types_are_refused_naming_the_field(kw, match):
    with pytest.raises(TypeError, match=match):
        TrainConfig(**kw)


def test_yaml_spellings_are_coerced(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\nhead_lr: 2E-2\nepochs: 3\nbatch_size: '16'\nmax_iterations: 4.0\n"
                 "truncate_from: '0.25'\nplots: 'false'\n")
    cfg = load_config(str(p))
    assert (cfg.lr, cfg.head_lr, cfg.epochs, cfg.batch_size, cfg.max_iterations) == (1e-3, 2e-2, 3.0, 16, 4)
    assert cfg.truncate_from == 0.25 and cfg.plots is False
    assert isinstance(cfg.epochs, float) and isinstance(cfg.batch_size, int)
    p.write_text("lr: 1e-3x\n")
    with pytest.raises(TypeError, match="lr must be a number, got the string '1e-3x'"):
        load_config(str(p))


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.sampled_from(["1e-3", "nan", "inf", "-1", "0", "12", "true"]))


@given(st.dictionaries(st.sampled_from(FLOAT_FIELDS + INT_FIELDS + ["plots", "budget", "fw"]), VALUES,
                       max_size=4))
def test_fuzz_config_is_valid_or_refused_naming_a_field(values):
    try:
        cfg = TrainConfig(**values)
    except (ValueError, TypeError) as err:
        msg = str(err)
        assert "\n" not in msg
        assert any(name in msg for name in HINTS), msg
        return
    for name in FLOAT_FIELDS:
        v = getattr(cfg, name)
        assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    for name in INT_FIELDS:
        v = getattr(cfg, name)
        assert v is None or (isinstance(v, int) and not isinstance(v, bool))
    assert TrainConfig(**cfg.to_dict()) == cfg          # a valid config is a fixed point
