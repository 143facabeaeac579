"""The lower level's lr schedules (debora.train.lr_schedule) against transformers' schedulers, and the
trainer using them (the lr of every AdamW step, resume-independent: a pure function of the step)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from debora.train import TrainConfig
from debora.train.lr_schedule import lr_factor

_HF = {"constant": lambda o, w, t: get_constant_schedule_with_warmup(o, w),
       "linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}


@settings(max_examples=40, deadline=None)
@given(schedule=st.sampled_from(sorted(_HF)), total=st.integers(1, 300), warmup=st.floats(0.0, 0.5))
def test_lr_factor_equals_transformers_schedules(schedule, total, warmup):
    """Step t of our schedule is the multiplier transformers' LambdaLR gives the t-th optimizer step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    w = int(round(warmup * total))
    hf = _HF[schedule](opt, w, total)
    for t in range(total):
        assert lr_factor(schedule, t, total, warmup) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        hf.step()


def test_lr_factor_rejects_bad_values():
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        lr_factor("step", 0, 10)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=1.0)
    with pytest.raises(ValueError, match="lr_schedule='cos'"):
        TrainConfig(lr_schedule="cos")


def test_trainer_steps_with_the_scheduled_lr(tmp_path, monkeypatch):
    """Every lower AdamW step of a run uses lr_factor(step) × the group's lr (bases: lr, head: head_lr),
    through truncations (the default regime prunes by the count budget while the lr decays)."""
    from debora.train import train
    from test_train_tiny import tiny_config

    seen = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    torch.set_num_threads(1)
    cfg = TrainConfig.from_preset("default", **{k: v for k, v in vars(tiny_config(tmp_path)).items()
                                                if k in ("model", "dataset", "text_column", "label_column",
                                                         "max_length", "output_dir", "device", "seed")},
                                  init_rank=4, target_rank=2, epochs=3.0, batch_size=32, lr=1e-2,
                                  head_lr=3e-2, inner_steps=2, lr_schedule="linear", warmup=0.2,
                                  eval_every=0, progress=False, plots=False)
    res = train(cfg)
    total = res.summary["iterations"] * cfg.inner_steps
    assert len(seen) == total and res.summary["rank_end"] < res.summary["rank_start"]
    for t, lrs in enumerate(seen):
        f = lr_factor("linear", t, total, 0.2)
        assert lrs == pytest.approx([1e-2 * f, 3e-2 * f], rel=1e-12, abs=1e-15)


def test_fw_step_follows_the_lr_schedule(tmp_path, monkeypatch):
    """fw_step_schedule="lr": the constant FW step at iteration n is fw_step_size × the lr factor of
    iteration n's last lower step (warm-up included); "constant" keeps fw_step_size at every step."""
    from bilevel.frank_wolfe.solvers import _FrankWolfe
    from debora.train import train
    from test_train_tiny import tiny_config

    gammas = []
    step = _FrankWolfe.step

    def record(self, *a, **k):
        gammas.append(self.rule.gamma)
        return step(self, *a, **k)

    monkeypatch.setattr(_FrankWolfe, "step", record)
    torch.set_num_threads(1)
    base = {k: v for k, v in vars(tiny_config(tmp_path)).items()
            if k in ("model", "dataset", "text_column", "label_column", "max_length", "device", "seed")}
    for schedule in ("lr", "constant"):
        gammas.clear()
        cfg = TrainConfig.from_preset("default", **base, output_dir=str(tmp_path / schedule), init_rank=4,
                                      target_rank=2, epochs=2.0, batch_size=32, inner_steps=2,
                                      lr_schedule="linear", warmup=0.2, fw_step_size=0.05,
                                      fw_step_schedule=schedule, eval_every=0, progress=False, plots=False)
        res = train(cfg)
        n_it = res.summary["iterations"]
        assert len(gammas) == n_it > 3
        for n, gamma in enumerate(gammas):
            want = 0.05 * lr_factor("linear", (n + 1) * 2 - 1, n_it * 2, 0.2) if schedule == "lr" else 0.05
            assert gamma == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_fw_step_schedule_needs_the_constant_step():
    with pytest.raises(ValueError, match="fw_step_schedule='lr'.*fw_step='constant'"):
        TrainConfig(fw_step="short", fw_step_schedule="lr")
    with pytest.raises(ValueError, match="fw_step_schedule='cubic' is not one of"):
        TrainConfig(fw_step_schedule="cubic")
