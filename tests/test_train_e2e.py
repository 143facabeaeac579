"""End to end: dEBORA training of a tiny random BERT on a tiny local csv (each run a few seconds)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import debora
from debora.train import train
from debora.train.metrics import read_metrics
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _feasible(s: torch.Tensor, tau: float, eps: float, blocks=None, tol=1e-5) -> bool:
    if s.numel() == 0:
        return True
    if bool((s < eps - tol).any()):
        return False
    if blocks is None:
        return float((s - eps).sum()) <= tau + tol
    return all(float((b - eps).sum()) <= tau + tol for b in blocks)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    seen = []

    def cb(trainer, state, extra):
        seen.append({k: v.detach().clone() for k, v in debora.upper_parameters(trainer.model).items()})

    # first-order, not the paper's closed form: with Euclidean bases the closed form is −∂_s f1 and
    # ascends F (README); with transformers 5.x this tiny run learns (0.69 → 0.38 at iteration 40) and
    # then collapses to 0.71 at the end under it, so "the loss falls" would test that finding instead.
    # The lr decays linearly: at tiny_config's constant lr 3e-2 this seed reaches an eval loss of 0.51
    # at iteration 44 and ends at 0.69 after a spike to 1.12 at 52 (transformers 5.24, torch 2.13): the
    # end-of-run check then measured that instability. With the linear decay the default trains with
    # now, the same seed ends at 0.49 (eval loss at iteration 0: 0.693)
    cfg = tiny_config(tmp, plots=True, export_peft=False, eval_every=4, estimator="first-order",
                      lr_schedule="linear")
    res = train(cfg, callback=cb)
    return cfg, res, seen


def test_loss_falls_and_outputs_written(base_run):
    cfg, res, _ = base_run
    recs = read_metrics(os.path.join(res.output_dir, "metrics.jsonl"))
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals[0]["iteration"] == 0 and evals[-1]["iteration"] == res.state.iteration
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05
    train_recs = [r for r in recs if r["kind"] == "train"]
    first = sum(r["lower_loss"] for r in train_recs[:3]) / 3
    last = sum(r["lower_loss"] for r in train_recs[-3:]) / 3
    assert last < first
    for name in ("summary.md", "summary.json", "config.json", "ranks.png", "s_trajectories.png",
                 "fw_gap.png", "curves.png"):
        assert os.path.isfile(os.path.join(res.output_dir, name)), name
    assert os.path.isdir(os.path.join(res.output_dir, "adapter"))
    summary = json.load(open(os.path.join(res.output_dir, "summary.json")))
    assert summary["eval_acc_end"] is not None and summary["trainable_start"] > 0
    assert "| layer | rank start | rank end |" in open(os.path.join(res.output_dir, "summary.md")).read()


def test_s_feasible_at_every_iteration(base_run):
    cfg, res, seen = base_run
    assert len(seen) == res.state.iteration
    for s in seen:
        vec = torch.cat([v.reshape(-1) for v in s.values()])
        assert _feasible(vec, cfg.tau, cfg.eps)


def test_per_layer_budget_feasible_and_other_estimator(tmp_path):
    seen = []

    def cb(trainer, state, extra):
        seen.append([v.detach().clone() for v in debora.upper_parameters(trainer.model).values()])

    cfg = tiny_config(tmp_path, budget="per_layer", tau=1.0, estimator="first-order",
                      max_iterations=8, fw_step="open-loop", grad_accum=2, inner_steps=2)
    res = train(cfg, callback=cb)
    # 8 iterations x 2 lower steps x 2 micro-batches of 16 over |D2| = 96: 5 epochs + 2 batches
    assert len(res.trainer.d2) == 96
    assert (res.state.d2.epoch, res.state.d2.offset) == (5, 32)
    assert (res.state.d1.epoch, res.state.d1.offset) == (2, 64)   # 8 x 2 micro-batches over |D1| = 96
    assert len(seen) == 8
    for blocks in seen:
        assert _feasible(torch.cat(blocks), cfg.tau, cfg.eps, blocks=blocks)


def test_small_tau_shrinks_ranks_and_truncation_removes_parameters(tmp_path):
    cfg = tiny_config(tmp_path, tau=0.05, init_rank=4, truncate_from=1, epochs=4.0)
    res = train(cfg)
    s = res.summary
    assert s["rank_end"] < s["rank_start"]
    assert s["trainable_end"] < s["trainable_start"]
    # the parameters are really gone: shapes of s and bases follow the ranks
    for name, layer in debora.adapter_layers(res.model).items():
        r = layer.rank
        assert layer.s.shape == (r,) and layer.U.shape[1] == r and layer.V.shape[1] == r
        assert s["ranks_end"][name] == r
    # optimizer state matches the new shapes, FW state matches the s vector
    for p in res.state.optimizer.param_groups[0]["params"]:
        st = res.state.optimizer.state.get(p, {})
        if "exp_avg" in st:
            assert st["exp_avg"].shape == p.shape
    svec = torch.cat([v.detach().reshape(-1) for v in debora.upper_parameters(res.model).values()])
    assert res.state.fw_state.x.shape == svec.shape
    torch.testing.assert_close(res.state.fw_state.x.to(svec.dtype), svec)
    assert res.state.layout.total == svec.numel()


def test_resume_reproduces_the_s_trajectory(tmp_path):
    full = tiny_config(tmp_path, output_dir=str(tmp_path / "full"), max_iterations=10, truncate_from=3,
                       tau=0.3, checkpoint_every=0)
    a = train(full)
    first = full.replace(output_dir=str(tmp_path / "split"), max_iterations=5)
    train(first)
    second = first.replace(max_iterations=10, resume="auto")
    b = train(second)
    ra = [r for r in read_metrics(os.path.join(a.output_dir, "metrics.jsonl")) if r["kind"] == "train"]
    rb = [r for r in read_metrics(os.path.join(b.output_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb] == list(range(1, 11))
    for x, y in zip(ra, rb):
        assert x["ranks"] == y["ranks"]
        for layer in x["s"]:
            torch.testing.assert_close(torch.tensor(x["s"][layer]), torch.tensor(y["s"][layer]),
                                       rtol=0, atol=1e-6)
    sa = torch.cat([v.reshape(-1) for v in debora.upper_parameters(a.model).values()])
    sb = torch.cat([v.reshape(-1) for v in debora.upper_parameters(b.model).values()])
    assert torch.equal(sa, sb)


def test_saved_adapter_reloads_with_equal_outputs(base_run):
    cfg, res, _ = base_run
    from debora.train.data import collate, load_text, tokenize
    from debora.train.models import forward, load_text_model
    tok, base, _ = load_text_model(cfg.model, 2)
    torch.manual_seed(123)
    reloaded = debora.from_pretrained(base, os.path.join(res.output_dir, "adapter"))
    raw = load_text(cfg)
    ex = tokenize(raw.subset(range(32)), tok, cfg.max_length)
    batch = collate(ex, range(32))
    res.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(reloaded, "text", batch), forward(res.model, "text", batch))


def test_armijo_pairwise_and_gap_tolerance(tmp_path):
    seen = []

    def cb(trainer, state, extra):
        seen.append(torch.cat([v.detach().reshape(-1).clone()
                               for v in debora.upper_parameters(trainer.model).values()]))

    res = train(tiny_config(tmp_path, fw="pairwise", fw_step="armijo", max_iterations=4), callback=cb)
    assert len(seen) == 4 and all(_feasible(s, 4.0, 1e-3) for s in seen)
    # p̃ above any gap: s stays at its initial value and is frozen after the first step (gap_patience=1;
    # the default of 5 consecutive gaps is tested in test_rank_selection.py)
    seen.clear()
    res = train(tiny_config(tmp_path, gap_tol=1e6, gap_patience=1, max_iterations=3,
                            output_dir=str(tmp_path / "frozen")), callback=cb)
    assert res.state.s_frozen
    assert all(torch.equal(s, seen[0]) for s in seen)
    s0 = 1e-3 + 4.0 / (res.state.layout.total + 1)
    torch.testing.assert_close(seen[0], torch.full_like(seen[0], s0))
