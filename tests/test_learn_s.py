"""learn_s (docs/rank_selection.md round 16): every adapter's s trained by the lower AdamW with the bases (a learned
magnitude per component), the budget's SVD cut still choosing the ranks. Checked: the first lower step
moves s by AdamW's first step on ∂f/∂s (computed here by autograd on the same batch), s stays >= ε, a run
lands on its budget, and a resume after the cut reproduces the uninterrupted run bit for bit; the same
with learn_log_s (round 18: AdamW on log s, multiplicative steps)."""
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


@pytest.mark.parametrize("mode", ["held", "s", "log_s"])
def test_the_first_lower_step_moves_s_by_adamw_on_its_gradient(tmp_path, mode):
    """AdamW's first step (bias-corrected moments m̂ = g, v̂ = g², no weight decay here) moves each s_i by
    −lr · g_i / (|g_i| + 1e-8), g = ∂f/∂s on the first D2 batch ("s"); with learn_log_s it moves
    θ_i = log s_i so, with g = s ⊙ ∂f/∂s (s_i ← s_i · exp(−lr · g_i / (|g_i| + 1e-8))); without learn_s,
    s does not move."""
    from debora.train.loop import Trainer
    from debora.train.run import prepare
    cpu = torch.device("cpu")
    learn = mode != "held"
    cfg = tiny_config(tmp_path, **dict(KW, learn_s=learn, learn_log_s=mode == "log_s", weight_decay=0.0,
                                       epochs=1.0, output_dir=str(tmp_path / mode)))
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
        if mode == "s":
            want = s0[name] - cfg.lr * g / (g.abs() + 1e-8)
        else:
            g = s0[name] * g
            want = s0[name] * torch.exp(-cfg.lr * g / (g.abs() + 1e-8))
        torch.testing.assert_close(moved, want.clamp_min(cfg.eps) - s0[name], rtol=1e-4, atol=1e-7)
    if learn:     # not vacuous: most components moved by about the full lr (relatively: for log s)
        scale = {n: (s0[n] if mode == "log_s" else torch.ones_like(s0[n])) for n in ups}
        step = torch.cat([((p.detach() - s0[n]) / scale[n]).abs() for n, p in ups.items()])
        assert float((step > 0.5 * cfg.lr).float().mean()) > 0.5


def test_log_space_step_is_adamw_on_log_p_over_several_steps():
    """Three AdamW steps of ``log_space_step`` on p (gradients of a fixed loss at each iterate) equal
    torch's AdamW on θ = log p with ∂f/∂θ = p ⊙ ∂f/∂p, in float64; the chain-rule factor matters from the
    second step on (the first is ±η per coordinate either way)."""
    from debora.train.loop import log_space_step
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    loss = lambda p: ((p - w) ** 2 * torch.arange(1.0, 6.0, dtype=torch.float64)).sum()
    p = torch.nn.Parameter(torch.rand(5, dtype=torch.float64) + 0.5)
    theta = torch.nn.Parameter(p.detach().log())
    opt_p = torch.optim.AdamW([p], lr=0.3, weight_decay=0.0)
    opt_t = torch.optim.AdamW([theta], lr=0.3, weight_decay=0.0)
    no_factor = torch.nn.Parameter(p.detach().log())   # the same without ∂θ = p ⊙ ∂p: must differ
    opt_n = torch.optim.AdamW([no_factor], lr=0.3, weight_decay=0.0)
    for _ in range(3):
        for o in (opt_p, opt_t, opt_n):
            o.zero_grad()
        loss(p).backward()
        log_space_step(opt_p, [p])
        loss(theta.exp()).backward()
        opt_t.step()
        x = no_factor.detach().exp().requires_grad_(True)
        no_factor.grad = torch.autograd.grad(loss(x), x)[0]
        opt_n.step()
    torch.testing.assert_close(p.detach(), theta.detach().exp(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(p.detach(), no_factor.detach().exp(), rtol=1e-6, atol=0)


def test_learn_log_s_needs_learn_s_and_keeps_s_out_of_weight_decay(tmp_path):
    from debora.train import TrainConfig
    from debora.train.loop import Trainer
    from debora.train.run import prepare
    with pytest.raises(ValueError, match="needs learn_s=True"):
        TrainConfig(learn_log_s=True)
    cfg = tiny_config(tmp_path, **dict(KW, learn_log_s=True, weight_decay=0.01))
    model, task, d1, d2, ev, _, _ = prepare(cfg, torch.device("cpu"))
    opt = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu")).init_state().optimizer
    s_ids = {id(p) for p in debora.upper_parameters(model).values()}
    (log_group,) = [g for g in opt.param_groups if g.get("log_s")]
    assert {id(p) for p in log_group["params"]} == s_ids and log_group["weight_decay"] == 0.0
    others = [p for g in opt.param_groups if not g.get("log_s") for p in g["params"]]
    assert others and not any(id(p) in s_ids for p in others)


@pytest.mark.slow
@pytest.mark.parametrize("log_s", [False, True])
def test_a_learn_s_run_lands_on_its_budget_and_resumes_bit_for_bit(tmp_path, log_s):
    kw = dict(KW, learn_log_s=log_s, epochs=2.0, max_iterations=12, checkpoint_every=4,
              output_dir=str(tmp_path / "full"))
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


def test_the_cli_flags_set_learn_s_and_learn_log_s():
    from debora.cli import build_parser, config_from_args
    assert config_from_args(build_parser().parse_args(["train", "--learn-s"])).learn_s
    both = config_from_args(build_parser().parse_args(["train", "--learn-s", "--learn-log-s"]))
    assert both.learn_s and both.learn_log_s
    plain = config_from_args(build_parser().parse_args(["train"]))
    assert not plain.learn_s and not plain.learn_log_s
