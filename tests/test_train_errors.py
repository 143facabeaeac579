"""Bad input gives clear errors; NaN steps are skipped, counted and abort past a limit; checkpoints are
written atomically (a failed save leaves the previous one intact)."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from debora.train import TrainConfig, train
from debora.train import checkpoint as ckpt
from debora.train.loop import NonFiniteError
from debora.train.metrics import read_metrics
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)


def test_unknown_model_path(tmp_path):
    cfg = tiny_config(tmp_path, model=str(tmp_path / "no_such_model"))
    with pytest.raises(ValueError, match="does not exist"):
        train(cfg)


def test_unknown_dataset_path(tmp_path):
    cfg = tiny_config(tmp_path, dataset=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        train(cfg)


def test_unknown_dataset_name_offline(tmp_path):
    cfg = tiny_config(tmp_path, dataset="surely-not-a-dataset-xyz")
    with pytest.raises(ValueError, match="could not load dataset"):
        train(cfg)


def test_missing_columns(tmp_path):
    cfg = tiny_config(tmp_path, text_column="review")
    with pytest.raises(ValueError, match="no column 'review'.*sentence"):
        train(cfg)
    cfg = tiny_config(tmp_path, label_column="stars")
    with pytest.raises(ValueError, match="no column 'stars'"):
        train(cfg)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_tau_must_be_positive(tau):
    with pytest.raises(ValueError, match="tau"):
        TrainConfig(tau=tau)


def test_eps_times_rank_below_tau():
    with pytest.raises(ValueError, match="eps\\*init_rank"):
        TrainConfig(tau=1.0, eps=0.2, init_rank=8)
    TrainConfig(tau=1.0, eps=0.1, init_rank=8)  # 0.8 < 1: fine


def test_other_bad_values():
    for kw in ({"budget": "layer"}, {"basis": "grassmann"}, {"fw_step": "big"}, {"eps": 0.0},
               {"inner_steps": 0}, {"batch_size": 0}, {"epochs": 0}):
        with pytest.raises(ValueError):
            TrainConfig(**kw)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_preset("paper", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("fast")


def test_empty_split(tmp_path):
    path = tmp_path / "one.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        w.writerow(["good movie", "pos"])
        w.writerow(["bad movie", "neg"])
    cfg = tiny_config(tmp_path, dataset=str(path))
    with pytest.raises(ValueError, match="eval split|empty"):
        train(cfg)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("sentence,sentiment\n")
    with pytest.raises(ValueError, match="no rows|empty|no labelled"):
        train(tiny_config(tmp_path, dataset=str(header_only)))


class NaNEstimator:
    """Returns a NaN hypergradient every time."""

    def __call__(self, problem, x, y, upper_batch, lower_batch):
        from bilevel.estimators import EstimatorInfo, HypergradResult
        return HypergradResult({k: torch.full_like(v, float("nan")) for k, v in x.items()}, EstimatorInfo())


def test_nan_hypergradient_skipped_counted_then_abort(tmp_path):
    cfg = tiny_config(tmp_path, max_iterations=3, max_nonfinite=5)
    with pytest.warns(RuntimeWarning, match="hypergradient has NaN"):
        res = train(cfg, estimator=NaNEstimator())
    assert res.state.skipped_upper == 3 and res.summary["nonfinite_skipped"] == 3
    s = torch.cat([v.reshape(-1) for v in __import__("debora").upper_parameters(res.model).values()])
    assert torch.isfinite(s).all()
    # past the limit: abort with a clear error, and the earlier checkpoint is untouched
    ck = os.path.join(res.output_dir, "checkpoint")
    before = open(os.path.join(ck, "state.json")).read()
    cfg2 = cfg.replace(max_iterations=20, max_nonfinite=2, output_dir=str(tmp_path / "run2"))
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteError, match="max_nonfinite=2"):
        train(cfg2, estimator=NaNEstimator())
    assert open(os.path.join(ck, "state.json")).read() == before


def test_nan_lower_loss_skipped(tmp_path, monkeypatch):
    import debora.train.loop as loop
    real = loop.forward
    calls = {"n": 0}

    def flaky(model, task, batch):   # the lower level's forward; NaN logits on the 2nd training step
        out = real(model, task, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 2:
                return out * float("nan")
        return out

    monkeypatch.setattr(loop, "forward", flaky)
    cfg = tiny_config(tmp_path, max_iterations=4, estimator="first-order")
    with pytest.warns(RuntimeWarning, match="lower loss is nan"):
        res = train(cfg)
    assert res.state.skipped_lower == 1 and res.summary["nonfinite_skipped"] == 1
    recs = [r for r in read_metrics(os.path.join(res.output_dir, "metrics.jsonl")) if r["kind"] == "nonfinite"]
    assert len(recs) == 1
    for p in __import__("debora").lower_parameters(res.model).values():
        assert torch.isfinite(p).all()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    ckpt.save(path, {"model": {"a": torch.ones(3)}}, {"iteration": 1})
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, {"model": {"a": torch.zeros(3)}}, {"iteration": 2})
    tensors, meta = ckpt.load(path, required=("model",))
    assert meta["iteration"] == 1 and torch.equal(tensors["model"]["a"], torch.ones(3))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_checkpoint_falls_back_to_old_after_interrupted_swap(tmp_path):
    path = str(tmp_path / "ck")
    ckpt.save(path, {"model": {"a": torch.ones(2)}}, {"iteration": 4})
    os.replace(path, path + ".old")            # crash between the two renames
    tensors, meta = ckpt.load(path, required=("model",))
    assert meta["iteration"] == 4


def test_resume_from_missing_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, resume=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no checkpoint"):
        train(cfg)
