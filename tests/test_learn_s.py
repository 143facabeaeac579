"""learn_s (docs/rank_selection.md round 16): every adapter's s trained by the lower AdamW with the bases (a learned
magnitude per component), the budget's SVD cut still choosing the ranks. Checked: the first lower step
moves s by AdamW's first step on ∂f/∂s (computed here by autograd on the same batch), s stays >= ε, a run
lands on its budget, and a resume after the cut reproduces the uninterrupted run bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch

import debora
from debora.train import train
from test_rank_selection import assert_resumes_and_reloads
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)

# the round-12 default's regime (oblique bases, s not moved by Frank-Wolfe, SVD cut σ²/param, refold
# layer_total) with s learned
KW = dict(estimator="first-order", budget="per_layer", basis="oblique", split="same", fw_step="constant",
          fw_step_size=0.0, tau=1.0, init_s=0.1, target_rank=1.0, prune_by="svd",
          svd_allocation="sigma2_per_param", refold_magnitudes="auto", prune_start=0.2, prune_end=0.5,
          truncate_from=0.1, eval_every=0, lr_schedule="linear", learn_s=True)


def test_learn_s_needs_frank_wolfe_off():
    from debora.train import TrainConfig
    with pytest.raises(ValueError, match="fw_step_size=0"):
        TrainConfig(learn_s=True, fw_step_size=0.05)
    assert TrainConfig(learn_s=True).learn_s and not TrainConfig().learn_s


def test_the_first_lower_step_moves_s_by_adamw_on_its_gradient(tmp_path):
    """AdamW's first step (bias-corrected moments m̂ = g, v̂ = g², no weight decay here) moves each s_i by
    −lr · g_i / (|g_i| + 1e-8), g = ∂f/∂s on the first D2 batch; without learn_s, s does not move."""
    from debora.train.loop import Trainer
    from debora.train.run import prepare
    cpu = torch.device("cpu")
    for learn in (True, False):
        cfg = tiny_config(tmp_path, **dict(KW, learn_s=learn, weight_decay=0.0, epochs=1.0,
                                           output_dir=str(tmp_path / f"r{learn}")))
        model, task, d1, d2, ev, _, _ = prepare(cfg, cpu)
        trainer = Trainer(model, cfg, task, d1, d2, ev, cpu)
        state = trainer.init_state()
        ups = debora.upper_parameters(model)
        s0 = {k: v.detach().clone() for k, v in ups.items()}
        batch = trainer.batch(trainer.d2, copy.deepcopy(state.d2).next())   # the batch the step will draw
        model.train()
        for p in ups.values():
            p.requires_grad_(True)
        from debora.train.models import forward, loss_fn
        grads = torch.autograd.grad(loss_fn(forward(model, task, batch), batch), list(ups.values()))
        for p in ups.values():
            p.requires_grad_(learn)
        acc = {"correct": torch.zeros((), dtype=torch.long), "seen": 0, "lower_loss": torch.zeros(()),
               "lower_steps": 0}
        trainer.lower_steps(state, acc)
        assert acc["lower_steps"] == 1
        for (name, p), g in zip(ups.items(), grads):
            moved = p.detach() - s0[name]
            if not learn:
                assert torch.equal(moved, torch.zeros_like(moved)), name
                continue
            want = (s0[name] - cfg.lr * g / (g.abs() + 1e-8)).clamp_min(cfg.eps) - s0[name]
            torch.testing.assert_close(moved, want, rtol=1e-4, atol=1e-7)
        if learn:     # not vacuous: most components moved by about the full lr
            step = torch.cat([(p.detach() - s0[n]).abs() for n, p in ups.items()])
            assert float((step > 0.5 * cfg.lr).float().mean()) > 0.5


@pytest.mark.slow
def test_a_learn_s_run_lands_on_its_budget_and_resumes_bit_for_bit(tmp_path):
    kw = dict(KW, epochs=2.0, max_iterations=12, checkpoint_every=4, output_dir=str(tmp_path / "full"))
    a = train(tiny_config(tmp_path, **kw))
    layers = debora.adapter_layers(a.model)
    assert sum(debora.rank_pattern(a.model).values()) == len(layers)       # target 1 per adapter
    s = torch.cat([l.s.detach() for l in layers.values()])
    assert bool((s >= a.trainer.cfg.eps).all())
    # the cut ends at 50%: refolded to the layer's initial Σs = 4 × 0.1, then trained on
    refolded = torch.full_like(s, 0.4)
    assert not torch.allclose(s, refolded, atol=1e-4)

    assert_resumes_and_reloads(a, tiny_config(tmp_path, **dict(kw, output_dir=str(tmp_path / "split"))),
                               tmp_path, stop_after=9)       # the checkpoint at 8 is after the cut


def test_the_cli_flag_sets_learn_s():
    from debora.cli import build_parser, config_from_args
    assert config_from_args(build_parser().parse_args(["train", "--learn-s"])).learn_s
    assert not config_from_args(build_parser().parse_args(["train"])).learn_s
