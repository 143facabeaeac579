"""Rank selection on tiny models: the budget schedule, dead components, rank-0 layers, dropout.

Each training run is a tiny random BERT on a tiny csv (a few seconds each).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import bilevel
import debora
from debora.train import train
from debora.train import checkpoint as ckpt
from debora.train.budget import scheduled_count, smallest_beyond
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)


# -- the schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["cubic", "linear"])
def test_schedule_is_monotone_and_hits_its_ends(shape):
    ks = [scheduled_count(n, 100, 96, 24, 0.1, 0.6, shape) for n in range(101)]
    assert ks[0] == ks[10] == 96                  # before prune_start: everything
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert ks[60] == ks[100] == 24                # from prune_end on: the target
    assert scheduled_count(50, 100, 8, 16, 0.1, 0.6, shape) == 8     # a target above R0 never prunes
    # halfway through the window: 24 + ceil(72 (1/2)^3) = 33 (cubic), 24 + 36 = 60 (linear)
    assert ks[35] == {"cubic": 33, "linear": 60}[shape]


def test_an_unknown_schedule_shape_is_refused():
    from debora.train import TrainConfig
    with pytest.raises(ValueError, match="prune_schedule"):
        TrainConfig(prune_schedule="quadratic")
    with pytest.raises(ValueError, match="shape"):
        scheduled_count(1, 10, 8, 2, 0.1, 0.6, "quadratic")


def test_smallest_beyond_never_takes_protected_or_dead():
    s = torch.tensor([0.5, 0.1, 0.3, 0.001, 0.2], dtype=torch.float64)
    alive = torch.tensor([True, True, True, False, True])
    protected = torch.tensor([False, True, False, False, False])
    out = smallest_beyond(s, alive, keep=2, protected=protected)
    # 4 alive, keep 2: remove the two smallest unprotected live ones (0.2 and 0.3), not 0.1 (protected)
    assert out.tolist() == [False, False, True, False, True]


def test_target_rank_validation():
    from debora.train import TrainConfig
    with pytest.raises(ValueError, match="target_rank"):
        TrainConfig(target_rank=0)
    with pytest.raises(ValueError, match="target_rank"):
        TrainConfig(target_rank=float("nan"))
    assert TrainConfig(init_rank=4, target_rank=5).target_rank == 5      # >= init_rank: never prunes
    with pytest.raises(ValueError, match="prune_start"):
        TrainConfig(prune_start=0.7, prune_end=0.6)


# -- training with a rank budget ----------------------------------------------------------------------
class _Stop(Exception):
    """Raised by _train_until's callback: the run ends right after that iteration (and its checkpoint)."""


def _train_until(cfg, iteration: int) -> None:
    """Train ``cfg`` and stop it after ``iteration``: what a killed run leaves for ``resume="auto"``."""
    def stop(trainer, state, extra):
        if state.iteration == iteration:
            raise _Stop
    with pytest.raises(_Stop):
        train(cfg, callback=stop)


def assert_resumes_and_reloads(a, cfg, tmp_path, stop_after: int) -> None:
    """``cfg`` (the config of the finished run ``a`` with another output_dir) stopped after ``stop_after``
    and resumed ends bit for bit where ``a`` did; ``a``'s saved adapter reloads onto a fresh tiny BERT
    with ``a.model``'s outputs."""
    from transformers import AutoModelForSequenceClassification
    _train_until(cfg, stop_after)
    b = train(cfg.replace(resume="auto"))
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    base = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "tiny_bert"))
    loaded = debora.from_pretrained(base, os.path.join(a.output_dir, "adapter")).eval()
    ids = torch.randint(0, base.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0))
    a.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, a.model(input_ids=ids).logits)


def _run(tmp_path, name, **kw):
    values = dict(epochs=4.0, eval_every=0, truncate_from=0.1, output_dir=str(tmp_path / name),
                  estimator="first-order", fw_step="constant", fw_step_size=0.05, budget="per_layer",
                  split="same")
    values.update(kw)
    return train(tiny_config(tmp_path, **values))


@pytest.mark.slow
def test_final_size_is_monotone_in_the_budget_and_lands_on_it(tmp_path):
    sizes, ranks = [], []
    layers = 12                                  # tiny BERT: 2 blocks x 6 Linear layers
    for target in (1, 2, 3):
        res = _run(tmp_path, f"t{target}", basis="oblique", init_s=0.01, target_rank=float(target))
        sizes.append(res.summary["adapter_end"])
        ranks.append(res.summary["rank_end"])
        # the count lands on the budget (a per-layer budget keeps >= 1 per layer: never below 12)
        assert res.summary["rank_end"] == max(target * layers, layers)
        assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert sizes[0] < sizes[1] < sizes[2]
    assert ranks[0] < ranks[1] < ranks[2]


@pytest.mark.parametrize("target_rank", [None, 2.0])
def test_components_without_signal_reach_the_floor_and_are_truncated(tmp_path, target_rank):
    """Components 0 and 1 of every layer get no hypergradient signal (g_i = 0), the others a negative
    one (growing them lowers F). Frank-Wolfe moves the budget to the components with signal: every FW
    step scales the other weights by 1 − γ, and a signal-free component is its block's away vertex
    (g_i = 0 > g_j), so drop steps put it exactly at the floor. Both with the paper's rule alone
    (target_rank=None: removed at ε) and with the count budget (smallest s first), they are truncated
    and the components with signal stay."""
    from debora.train.loop import Trainer
    from debora.train.run import prepare, resolve_device

    class Signal:
        name = "synthetic"

        def __call__(self, problem, x, y, upper_batch, lower_batch):
            lay = trainer_box[0]._state_layout
            gen = torch.Generator().manual_seed(len(calls))
            calls.append(1)
            grad = {}
            for k, v in x.items():
                ids = torch.tensor(lay.ids[k])
                noise = 1.0 + torch.rand(v.shape, generator=gen, dtype=v.dtype)
                grad[k] = torch.where(ids < 2, torch.zeros_like(v), -noise)
            # the trainer reads only .grad and .info.upper_value of an estimator's result
            return SimpleNamespace(grad=grad, info=SimpleNamespace(upper_value=None))

    calls, trainer_box = [], []
    cfg = tiny_config(tmp_path, epochs=4.0, eval_every=0, truncate_from=0.1, fw_step="constant",
                      fw_step_size=0.1, budget="per_layer", basis="oblique", init_s=0.05,
                      target_rank=target_rank, output_dir=str(tmp_path / f"dead{target_rank}"))
    model, task, d1, d2, ev, splits, info = prepare(cfg, resolve_device("cpu"))
    trainer = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu"), estimator=Signal())
    trainer_box.append(trainer)
    state = trainer.train(progress=False)
    survivors = {n[:-2]: set(v) for n, v in state.layout.ids.items()}
    assert all(not (ids & {0, 1}) for ids in survivors.values()), survivors
    if target_rank is not None:
        assert sum(len(v) for v in survivors.values()) == 2 * len(survivors)


# -- rank 0 under a global budget ---------------------------------------------------------------------
def _tiny_bert(dropout=0.0):
    torch.manual_seed(0)
    # SDPA attention (the default): cg's products run it on the math backend (second_order_mode)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (6, 8), generator=g), "labels": torch.randint(0, 2, (6,), generator=g)}


def _loss(out, batch):
    return torch.nn.functional.cross_entropy(out.logits, batch["labels"])


@pytest.mark.parametrize("basis", ["euclidean", "oblique"])
def test_layer_at_rank_zero_under_global_budget_trains_saves_loads_exports(tmp_path, basis):
    cfg = debora.DeboraConfig(target_modules=["query", "value"], init_rank=3, tau=2.0, eps=1e-3,
                              budget="global", basis=basis, modules_to_save=["classifier"], init_seed=0)
    model = debora.inject(_tiny_bert(), cfg)
    if basis == "euclidean":   # give U a value so that the adapter does something
        with torch.no_grad():
            for layer in debora.adapter_layers(model).values():
                layer.U.normal_(0, 0.1)
    name = "bert.encoder.layer.0.attention.self.query"
    with torch.no_grad():
        debora.adapter_layers(model)[name].s.fill_(cfg.eps)
    debora.truncate(model, atol=0.0)
    assert debora.rank_pattern(model)[name] == 0
    problem, x, y = debora.bilevel_problem(model, _loss)
    assert all(v.numel() for v in x.values()) and all(v.numel() for v in y.values())
    for est in ("first-order", "debora-closed-form", "cg"):
        res = bilevel.estimators.get(est, **({"damping": 1e-3} if est == "cg" else {}))(
            problem, x, y, _batch(0), _batch(1))
        assert set(res.grad) == set(x) and all(torch.isfinite(g).all() for g in res.grad.values())
    # a lower step still trains the other layers
    opt = torch.optim.SGD(list(debora.lower_parameters(model).values()), lr=0.1)
    _loss(model(input_ids=_batch()["input_ids"]), _batch()).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=_batch()["input_ids"]).logits
    debora.save_pretrained(model, str(tmp_path / "ad"))
    loaded = debora.from_pretrained(_tiny_bert(), str(tmp_path / "ad")).eval()
    assert debora.rank_pattern(loaded)[name] == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_batch()["input_ids"]).logits, ref)
    debora.export_peft(model, str(tmp_path / "peft"))
    assert os.path.isfile(tmp_path / "peft" / "adapter_config.json")
    merged = debora.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_batch()["input_ids"]).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_global_budget_run_survives_rank_zero_layers(tmp_path):
    res = _run(tmp_path, "glob", basis="oblique", init_s=0.01, budget="global", target_rank=0.5,
               init_rank=2, tau=2.0)
    ranks = debora.rank_pattern(res.model)
    assert 0 in ranks.values() and sum(ranks.values()) >= 1
    assert os.path.isdir(os.path.join(res.output_dir, "adapter"))


# -- dropout is off during the hypergradient ------------------------------------------------------------
def test_dropout_is_off_during_the_hypergradient(tmp_path):
    from debora.train.loop import Trainer
    seen = []

    class Spy:
        name = "spy"

        def __call__(self, problem, x, y, upper_batch, lower_batch):
            seen.append(trainer.model.training)
            g = bilevel.estimators.get("first-order")(problem, x, y, upper_batch, lower_batch)
            # the same batch twice gives the same gradient only without dropout
            g2 = bilevel.estimators.get("first-order")(problem, x, y, upper_batch, lower_batch)
            seen.append(all(torch.equal(g.grad[k], g2.grad[k]) for k in g.grad))
            return g

    from debora.train.run import prepare, resolve_device
    cfg = tiny_config(tmp_path, max_iterations=2, eval_every=0, truncate_from=-1, estimator="first-order")
    model, task, d1, d2, ev, splits, info = prepare(cfg, resolve_device("cpu"))
    for m in model.modules():                    # switch dropout on in the base model
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    trainer = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu"), estimator=Spy())
    trainer.train(progress=False)
    assert seen and seen[0::2] == [False] * (len(seen) // 2)
    assert all(seen[1::2])
    assert model.training            # the lower level goes on in train mode


def test_a_single_small_gap_does_not_freeze_s(tmp_path):
    from debora.train.loop import Trainer, TrainState
    from debora.train.run import prepare, resolve_device
    cfg = tiny_config(tmp_path, max_iterations=1, eval_every=0, truncate_from=-1, gap_tol=1e-3,
                      gap_patience=3, estimator="first-order")
    model, task, d1, d2, ev, splits, info = prepare(cfg, resolve_device("cpu"))
    trainer = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu"))
    state = trainer.init_state()
    small = {k: torch.zeros_like(v) for k, v in debora.upper_parameters(model).items()}   # gap 0
    big = {k: -torch.ones_like(v) for k, v in debora.upper_parameters(model).items()}
    for g, frozen in ((small, False), (big, False), (small, False), (small, False), (small, True)):
        trainer.fw_update(state, g)
        assert state.s_frozen is frozen


def test_frank_wolfe_steps_on_the_averaged_gradient(tmp_path):
    """fw_grad_averaging = ρ: the solver gets d_n = (1 − ρ) d_{n−1} + ρ g_n (a spy solver records it)."""
    from debora.train.loop import Trainer
    from debora.train.run import prepare, resolve_device
    cfg = tiny_config(tmp_path, max_iterations=1, eval_every=0, truncate_from=-1, estimator="first-order",
                      fw_grad_averaging=0.25)
    model, task, d1, d2, ev, splits, info = prepare(cfg, resolve_device("cpu"))
    trainer = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu"))
    state = trainer.init_state()
    solver, seen = trainer.make_fw(state.layout), []
    step = solver.step
    solver.step = lambda g, st, objective=None: (seen.append(g.clone()), step(g, st, objective=objective))[1]
    gen = torch.Generator().manual_seed(0)
    gs = [{k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in debora.upper_parameters(model).items()}
          for _ in range(3)]
    for g in gs:
        trainer.fw_update(state, g)
    flat = [state.layout.flatten(g).to(seen[0].dtype) for g in gs]
    expected = [flat[0], 0.75 * flat[0] + 0.25 * flat[1]]
    expected.append(0.75 * expected[1] + 0.25 * flat[2])
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want)
    assert state.grad_avg.n == 3
    with pytest.raises(ValueError, match="fw_grad_averaging"):
        tiny_config(tmp_path, fw_grad_averaging=0.0)


# -- exact resume in the default regime (fused first-order, count budget) -------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("rho, budget", [(1.0, {}), (0.2, {}),
                                         (1.0, dict(target_params=1500, prune_allocation="s2_per_param"))])
def test_resume_in_the_default_regime_reproduces_the_run(tmp_path, rho, budget):
    """rho < 1: the averaged FW gradient d_n travels with the checkpoint and loses truncated coordinates;
    a parameter budget with the s²-per-parameter allocation resumes as exactly as the count budget."""
    from debora.train.metrics import read_metrics
    kw = dict(epochs=2.0, max_iterations=12, basis="oblique", init_s=0.01, tau=1.0, target_rank=2.0,
              split="same", estimator="first-order", fw_step="constant", fw_step_size=0.05,
              budget="per_layer", truncate_from=0.1, eval_every=0, checkpoint_every=5,
              lr_schedule="linear", warmup=0.1,      # the default's decaying lr, from the checkpoint on
              fw_grad_averaging=rho, **budget)
    a = train(tiny_config(tmp_path, output_dir=str(tmp_path / "full"), **kw))
    assert a.trainer.fused

    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "split"), **kw)
    _train_until(cfg, 5)
    if rho < 1:   # the checkpoint at iteration 5 holds d_5 over the s still alive (ranks cut after it)
        tensors, meta = ckpt.load(os.path.join(cfg.output_dir, "checkpoint"))
        assert meta["fw_avg_n"] == 5
        assert tensors["fw_avg"]["d"].shape == (sum(meta["ranks"].values()),)
    b = train(cfg.replace(resume="auto"))
    ra = [r for r in read_metrics(os.path.join(a.output_dir, "metrics.jsonl")) if r["kind"] == "train"]
    rb = [r for r in read_metrics(os.path.join(b.output_dir, "metrics.jsonl")) if r["kind"] == "train"]
    rb = {r["iteration"]: r for r in rb}          # iterations 1-5 are logged before the stop
    for x in ra:
        y = rb[x["iteration"]]
        assert x["ranks"] == y["ranks"]
        for layer in x["s"]:
            assert x["s"][layer] == y["s"][layer]
    for (ka, va), (kb, vb) in zip(debora.lower_parameters(a.model).items(),
                                  debora.lower_parameters(b.model).items()):
        assert ka == kb and torch.equal(va, vb)


def test_ties_at_the_floor_are_broken_at_random_not_by_position():
    s = torch.full((100,), 1e-3, dtype=torch.float64)          # all at the floor: all tied
    alive = torch.ones(100, dtype=torch.bool)
    out = smallest_beyond(s, alive, keep=50, protected=torch.zeros(100, dtype=torch.bool),
                          generator=torch.Generator().manual_seed(0))
    assert int(out.sum()) == 50
    assert int(out[:50].sum()) < 40 and int(out[50:].sum()) > 10   # not the first 50 positions
    s[7] = 0.5                                                     # the one with weight always stays
    out = smallest_beyond(s, alive, keep=1, protected=torch.zeros(100, dtype=torch.bool),
                          generator=torch.Generator().manual_seed(1))
    assert not out[7] and int(out.sum()) == 99


# -- SVD re-factorisation (prune_by="svd") -------------------------------------------------------------
@pytest.mark.parametrize("basis", ["oblique", "stiefel", "euclidean"])
def test_svd_refactor_keeps_the_update_and_the_fw_set(basis):
    """ΔW (and so the model) is unchanged; the bases become orthonormal (non-Euclidean); Σ s does not
    grow (‖ΔW‖_* ≤ Σ s for unit columns), so an FW iterate stays feasible; cutting the tail is the best
    approximation of that rank (Eckart–Young: the error is the dropped singular values)."""
    torch.manual_seed(0)
    model = debora.inject(_tiny_bert().double().eval(),
                          debora.DeboraConfig(target_modules=["query", "value"], init_rank=4, basis=basis))
    gen = torch.Generator().manual_seed(1)
    for layer in debora.adapter_layers(model).values():
        with torch.no_grad():
            layer.U.copy_(debora.manifolds.random_point(basis, layer.U.shape[0], 4, gen, torch.float64))
            layer.V.copy_(debora.manifolds.random_point(basis, layer.V.shape[0], 4, gen, torch.float64))
            layer.s.copy_(torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64))
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model(**inputs).logits
    dw = {n: l.delta_weight().clone() for n, l in debora.adapter_layers(model).items()}
    ids = {n: (id(l.U), id(l.V), id(l.s)) for n, l in debora.adapter_layers(model).items()}
    debora.svd_refactor(model)
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=1e-12)
    for n, layer in debora.adapter_layers(model).items():
        assert (id(layer.U), id(layer.V), id(layer.s)) == ids[n]          # same Parameters, in place
        torch.testing.assert_close(layer.delta_weight(), dw[n], rtol=0, atol=1e-12)
        sig = torch.linalg.svdvals(dw[n]) / layer.scaling
        assert torch.all(layer.s[:-1] >= layer.s[1:])                    # descending
        assert float(layer.s.sum()) <= 0.65 + 1e-12                     # Σ s did not grow
        if basis != "euclidean":
            torch.testing.assert_close(layer.s, sig[:4], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(4, dtype=torch.float64))
            torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(4, dtype=torch.float64))
        # keeping the first two components leaves exactly the tail σ3, σ4 as the error (Eckart–Young)
        layer.keep_(torch.arange(2))
        err = torch.linalg.matrix_norm(layer.delta_weight() - dw[n]) / layer.scaling
        torch.testing.assert_close(err, sig[2:4].norm(), rtol=1e-9, atol=1e-12)


def test_svd_refactor_resets_the_optimizer_state_of_the_bases():
    model = debora.inject(_tiny_bert(), debora.DeboraConfig(target_modules=["query"], init_rank=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(**{k: v for k, v in _batch().items() if k != "labels"}).logits.sum()
    out.backward()
    opt.step()
    layer = next(iter(debora.adapter_layers(model).values()))
    assert float(opt.state[layer.U]["exp_avg"].abs().sum()) > 0
    debora.svd_refactor(model, optimizer=opt)
    for p in (layer.U, layer.V):
        assert all(float(v.abs().sum()) == 0 for v in opt.state[p].values())   # moments and step


@pytest.mark.parametrize("shape", ["cubic", "linear"])
def test_the_live_count_follows_the_schedule_it_is_given(tmp_path, shape):
    """After every truncation point the number of live components is exactly k(n) of prune_schedule."""
    seen = {}

    def record(trainer, state, extra):
        seen[state.iteration] = (sum(debora.rank_pattern(trainer.model).values()), trainer.total_iterations,
                                 trainer.n0)
    res = train(tiny_config(tmp_path, **dict(epochs=4.0, eval_every=0, truncate_from=0.1,
                                             output_dir=str(tmp_path / shape), estimator="first-order",
                                             fw_step="constant", fw_step_size=0.0, budget="per_layer",
                                             split="same", basis="oblique", init_s=0.01, target_rank=1.0,
                                             prune_by="svd", prune_start=0.2, prune_end=0.7,
                                             prune_schedule=shape)), callback=record)
    layers = len(debora.adapter_layers(res.model))
    checked = 0
    for n, (live, total, n0) in seen.items():
        if n >= n0:
            assert live == scheduled_count(n, total, 4 * layers, layers, 0.2, 0.7, shape), n
            checked += 1
    assert checked > 10 and live == layers


def test_svd_pruning_lands_on_the_budget_and_trains(tmp_path):
    res = _run(tmp_path, "svd", basis="oblique", init_s=0.01, target_rank=1.0, prune_by="svd",
               prune_start=0.2, prune_end=0.7)
    layers = debora.adapter_layers(res.model)
    assert sum(debora.rank_pattern(res.model).values()) == len(layers)
    for layer in layers.values():                       # rank 1 per layer, unit columns (oblique)
        if layer.rank:
            torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(layer.rank), atol=1e-4, rtol=0)
    assert res.summary["eval_acc_end"] >= 0.0 and res.summary["rank_end"] == len(layers)


def test_a_zero_constant_step_holds_s_and_the_svd_cut_still_lands_on_the_budget(tmp_path):
    """fw_step_size = 0: no Frank-Wolfe step, s stays at init_s until the (global, SVD) cut at the end;
    a global budget lets some layers reach rank 0."""
    res = _run(tmp_path, "held", basis="euclidean", init_s=1.0, tau=48.0, budget="global", init_rank=4,
               fw_step_size=0.0, prune_by="svd", prune_start=0.99, prune_end=1.0, target_rank=1.0)
    ups = debora.upper_parameters(res.model)
    assert sum(debora.rank_pattern(res.model).values()) == 12          # 1 × 12 layers, allocated globally
    rec = [r for r in map(__import__("json").loads, open(tmp_path / "held" / "metrics.jsonl"))
           if r["kind"] == "train"]
    before_cut = [r for r in rec if r["total_rank"] == 48]
    assert before_cut and all(not r["removed"] for r in before_cut)
    first = before_cut[0]["s"]
    assert all(v == pytest.approx(1.0) for vals in first.values() for v in vals)
    assert all(r["s"] == first for r in before_cut)                      # s held until the cut
    assert all(torch.isfinite(p).all() for p in ups.values())


def test_the_svd_cut_preset_lands_on_the_budget_with_some_layers_at_rank_zero_allowed(tmp_path):
    from debora.train.config import PRESETS
    res = _run(tmp_path, "preset", **dict(PRESETS["svd-cut"], init_rank=4, target_rank=2.0))
    ranks = debora.rank_pattern(res.model)
    assert sum(ranks.values()) == 24 and max(ranks.values()) <= 4          # 2 × 12 layers, globally
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.summary["adapter_end"] < res.summary["adapter_start"]


@pytest.mark.parametrize("basis", ["oblique", "stiefel", "euclidean"])
def test_svd_refactor_of_pointwise_cp_conv_adapters_keeps_the_kernel(basis):
    """A 1×1 CP adapter is the matrix A diag(s∘c∘d) Bᵀ: re-factorised like a matrix adapter (same ΔK
    to 1e-12 in float64, s = σ(ΔK)/scaling, C = D = 1, Eckart–Young tail); a 3×3 CP adapter has no SVD
    and is left exactly as it was."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 5, 1), torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 3, padding=1))
    model = debora.inject(net.double().eval(), debora.DeboraConfig(target_modules=["0", "2"], init_rank=4,
                                                                   basis=basis))
    gen = torch.Generator().manual_seed(1)
    layers = debora.adapter_layers(model)
    for layer in layers.values():
        with torch.no_grad():
            for n in layer.basis_names:
                P = getattr(layer, n)
                P.copy_(debora.manifolds.random_point(layer.basis_kinds[n], P.shape[0], 4, gen,
                                                      torch.float64))
            layer.s.copy_(torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64))
    pw, k3 = layers["0"], layers["2"]
    if basis != "euclidean":                                          # 1×1 factors: ±1 on the oblique set
        torch.testing.assert_close(pw.C.abs(), torch.ones_like(pw.C), rtol=0, atol=1e-12)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=gen)
    before = model(x)
    dk = {n: l.delta_weight().clone() for n, l in layers.items()}
    k3_before = {n: getattr(k3, n).clone() for n in (*k3.basis_names, "s")}
    assert debora.singular_values(k3).tolist() == k3.s.tolist()      # no SVD: its s as it is
    out = debora.svd_refactor(model)
    assert list(out) == ["0"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    for n in (*k3.basis_names, "s"):
        assert torch.equal(getattr(k3, n), k3_before[n])
    torch.testing.assert_close(pw.delta_weight(), dk["0"], rtol=0, atol=1e-12)
    sig = torch.linalg.svdvals(dk["0"][:, :, 0, 0]) / pw.scaling
    assert torch.equal(pw.C, torch.ones_like(pw.C)) and torch.equal(pw.D, torch.ones_like(pw.D))
    assert torch.all(pw.s[:-1] >= pw.s[1:]) and float(pw.s.sum()) <= 0.65 + 1e-12
    if basis != "euclidean":
        torch.testing.assert_close(pw.s, sig[:4], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(debora.singular_values(pw), sig[:4], rtol=1e-10, atol=1e-12)
    pw.keep_(torch.arange(2))
    err = torch.linalg.matrix_norm((pw.delta_weight() - dk["0"])[:, :, 0, 0]) / pw.scaling
    torch.testing.assert_close(err, sig[2:4].norm(), rtol=1e-9, atol=1e-12)


def test_the_svd_cut_preset_on_the_packaged_cnn_cuts_its_pointwise_cp_adapters(tmp_path, monkeypatch):
    """The image path: the packaged EfficientNet-Lite0's adapted convolutions are 1×1 (its k×k ones are
    depthwise), so the svd-cut preset re-factorises and cuts them by singular value, without the
    "no SVD" warning, and lands on target_rank × layers components."""
    import warnings
    from debora.train import TrainConfig
    from debora.train.config import PRESETS
    from test_train_tiny import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, train=48, test=16)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    cfg = TrainConfig(**dict(PRESETS["svd-cut"], dataset="fashion-mnist", init_rank=2, target_rank=1.0,
                             epochs=1.0, batch_size=16, image_size=32, eval_every=0, progress=False,
                             plots=False, seed=0, device="cpu", output_dir=str(tmp_path / "run")))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*have no SVD.*")
        res = train(cfg)
    layers = debora.adapter_layers(res.model)
    assert layers and all(isinstance(l, debora.layers.CPConv2dAdapter) and l.kh == l.kw == 1
                          for l in layers.values())
    assert sum(debora.rank_pattern(res.model).values()) == len(layers)       # 1 × layers, globally
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    cut = [l for l in layers.values() if l.rank == 1]       # re-factorised: s = c·σ, no longer held at 1
    assert cut and all(float(l.s[0]) != 1.0 and torch.equal(l.C, torch.ones_like(l.C)) for l in cut)


def test_the_fixed_oblique_preset_keeps_its_rank_and_magnitudes_and_turns_the_bases(tmp_path):
    """`--preset fixed-oblique`: no Frank-Wolfe step, no count budget, no truncation: every layer keeps
    init_rank components with s = 1 while its unit-norm bases train (they move off their start)."""
    from debora.train.config import PRESETS
    cfg = tiny_config(tmp_path, **dict(PRESETS["fixed-oblique"], init_rank=2, epochs=2.0, eval_every=0,
                                       output_dir=str(tmp_path / "fixed")))
    assert cfg.target_rank is None and cfg.fw_step_size == 0.0 and cfg.basis == "oblique"
    start = {}

    def remember(trainer, state, info):          # the bases after the first iteration
        if not start:
            start.update({n: l.U.detach().clone() for n, l in debora.adapter_layers(trainer.model).items()})

    res = train(cfg, callback=remember)
    layers = debora.adapter_layers(res.model)
    assert set(debora.rank_pattern(res.model).values()) == {2} and len(layers) == 12
    for name, layer in layers.items():
        assert torch.equal(layer.s.detach(), torch.ones(2))                  # s held at exactly 1
        torch.testing.assert_close(layer.U.norm(dim=0), torch.ones(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.V.norm(dim=0), torch.ones(2), atol=1e-5, rtol=0)
    assert set(start) == set(layers)
    assert min(float((layers[n].U.detach() - u).norm()) for n, u in start.items()) > 1e-3   # the bases trained on
    assert res.summary["adapter_end"] == res.summary["adapter_start"]


# -- the unfolded SVD cut (round 5): cut what training changed, ΔW − ΔW0 ------------------------------
def _trained_like(model, gen):
    """Move every adapter off its start, as training would (random bases on the manifold, new s)."""
    for layer in debora.adapter_layers(model).values():
        with torch.no_grad():
            for n in layer.basis_names:
                P = getattr(layer, n)
                P.copy_(debora.manifolds.random_point(layer.basis_kinds[n], P.shape[0], P.shape[1], gen,
                                                      torch.float64))
            layer.s.copy_(torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "pointwise-conv"])
@pytest.mark.parametrize("basis", ["oblique", "stiefel"])
def test_an_unfolded_svd_refactor_is_the_best_approximation_of_what_training_changed(basis, kind):
    """Folded layer: effective weight W − ΔW0 + ΔW = W + E with E = ΔW − ΔW0 (rank ≤ 2r).
    ``svd_refactor(unfold=True)`` puts W back and the adapter at the best rank-r approximation of E
    (Eckart–Young, float64 dense SVD as the reference): s = σ(E)[:r]/scaling, orthonormal bases, no
    ΔW0 buffers left; ``singular_values(unfold=True)`` gives that s beforehand."""
    torch.manual_seed(0)
    if kind == "linear":
        net = _tiny_bert().double().eval()
        targets = ["query", "value"]
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(9, 7, 1), torch.nn.ReLU(), torch.nn.Conv2d(7, 8, 1)).double()
        targets = ["0", "2"]
    originals = {n: m.weight.detach().clone() for n, m in net.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    model = debora.inject(net, debora.DeboraConfig(target_modules=targets, init_rank=4, basis=basis,
                                                   init_s=0.2, tau=8.0))
    _trained_like(model, torch.Generator().manual_seed(1))
    layers = debora.adapter_layers(model)
    assert layers and all(l.folded for l in layers.values())
    E = {n: (l.delta_weight() - l.unfold_delta()).reshape(l.weight_ref.shape[0], -1).clone()
         for n, l in layers.items()}
    ahead = {n: debora.singular_values(l, unfold=True) for n, l in layers.items()}
    debora.svd_refactor(model, unfold=True)
    for n, layer in layers.items():
        P, sig, Qt = torch.linalg.svd(E[n])
        best = (P[:, :4] * sig[:4]) @ Qt[:4]
        assert not layer.folded and not layer.init_factors()
        torch.testing.assert_close(layer.weight_ref, originals[n], rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.delta_weight().reshape(best.shape), best, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.s, sig[:4] / layer.scaling, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ahead[n], sig[:4] / layer.scaling, rtol=1e-10, atol=1e-12)
        U = layer.A if kind != "linear" else layer.U
        torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
        assert sig[4:8].abs().max() > 1e-3          # E really had rank > r: the test is not vacuous


@pytest.mark.parametrize("refold", ["off", "init_s", "layer_total"])
def test_an_unfolding_svd_cut_saves_loads_and_resumes(tmp_path, refold):
    """An oblique run with s held at 1 and an SVD cut in the middle: the layers that lose components
    are unfolded (their ΔW0 is back in W, the adapter carries ΔW − ΔW0's best approximation) and, with
    ``refold_magnitudes``, their survivors get s = 1 again over a newly folded ΔW0'. The saved adapter
    reloads onto a fresh base model with the same outputs and exports to PEFT, and a resume from a
    checkpoint taken after the cut reproduces the uninterrupted run bit for bit."""
    from debora.train.config import PRESETS

    kw = dict(PRESETS["svd-cut"], basis="oblique", init_rank=4, target_rank=1.0, prune_start=0.4,
              prune_end=0.5, epochs=2.0, max_iterations=12, eval_every=0, checkpoint_every=4,
              refold_magnitudes=refold, output_dir=str(tmp_path / f"full{refold}"))
    a = train(tiny_config(tmp_path, **kw))
    layers = debora.adapter_layers(a.model)
    assert sum(debora.rank_pattern(a.model).values()) == len(layers)
    cut = [n for n, l in layers.items() if 0 < l.rank < 4]     # (a global cut may empty a layer)
    assert cut
    for n in cut:
        layer = layers[n]
        if refold != "off":   # refolded: s = init_s = 1 (or Σs = r0 = 4 over the layer), a new ΔW0'
            want = 1.0 if refold == "init_s" else 4.0 / layer.rank        # (zero-padded to r0 = 4 columns)
            assert layer.folded and torch.equal(layer.s.detach(), torch.full((layer.rank,), want))
            assert layer.init_factors()["U"].shape == (layer.U.shape[0], 4)
        else:            # unfolded: s = σ(ΔW − ΔW0), no folded factors left
            assert not layer.folded and not layer.init_factors()

    assert_resumes_and_reloads(a, tiny_config(tmp_path, **dict(kw, output_dir=str(tmp_path / f"split{refold}"))),
                               tmp_path, stop_after=9)       # the checkpoint at 8 is after the cut
    debora.export_peft(a.model, str(tmp_path / "peft"))
    assert os.path.isfile(tmp_path / "peft" / "adapter_config.json")


@pytest.mark.parametrize("kind", ["linear", "pointwise-conv"])
def test_refolded_magnitudes_leave_the_model_unchanged_and_round_trip(tmp_path, kind):
    """refold_magnitudes_: kept components get s = s0, the difference is folded into W, the outputs
    are the same to 1e-12 (float64); the zero-padded buffers save and load exactly; a folded layer is
    refused with an error that names the fix."""
    torch.manual_seed(0)
    if kind == "linear":
        make = lambda: _tiny_bert().double().eval()          # noqa: E731
        targets, x = ["query", "value"], {"input_ids": _batch()["input_ids"]}
        run = lambda m: m(**x).logits                         # noqa: E731
    else:
        torch.manual_seed(0)
        net0 = torch.nn.Sequential(torch.nn.Conv2d(9, 7, 1), torch.nn.ReLU(), torch.nn.Conv2d(7, 8, 1)).double()
        make = lambda: __import__("copy").deepcopy(net0)     # noqa: E731
        targets, x = ["0", "2"], torch.randn(2, 9, 4, 4, dtype=torch.float64)
        run = lambda m: m(x)                                  # noqa: E731
    torch.manual_seed(1)
    model = debora.inject(make(), debora.DeboraConfig(target_modules=targets, init_rank=4, basis="oblique",
                                                      init_s=0.2, tau=8.0))
    _trained_like(model, torch.Generator().manual_seed(1))
    layer0 = next(iter(debora.adapter_layers(model).values()))
    with pytest.raises(ValueError, match="unfold=True"):
        debora.refold_magnitudes_(layer0, torch.ones(4, dtype=torch.bool), 1.0, 4)
    debora.svd_refactor(model, unfold=True)
    for layer in debora.adapter_layers(model).values():
        layer.keep_(torch.arange(3))                          # a cut to rank 3
    with torch.no_grad():
        before = run(model).clone()
    keep = torch.tensor([True, True, False])
    for layer in debora.adapter_layers(model).values():
        s_before = layer.s.detach().clone()
        debora.refold_magnitudes_(layer, keep, 1.0, 4)
        assert layer.folded
        assert torch.equal(layer.s.detach(), torch.tensor([1.0, 1.0, float(s_before[2])], dtype=torch.float64))
        assert all(t.shape[1] == 4 and not t[:, 3:].any() for n, t in layer.init_factors().items()
                   if n in ("U", "A"))
    with torch.no_grad():
        torch.testing.assert_close(run(model), before, rtol=0, atol=1e-12)
    debora.save_pretrained(model, str(tmp_path / "ad"))
    loaded = debora.from_pretrained(make(), str(tmp_path / "ad"))
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), before, rtol=0, atol=1e-12)
    # a loaded fold is not the injection's: a trainer that checkpoints it must save its factors
    assert all(l.folded and l.refolded for l in debora.adapter_layers(loaded).values())


def test_svd_allocation_and_refold_validation():
    from debora.train import TrainConfig
    from debora.train.config import PRESETS
    with pytest.raises(ValueError, match="svd_allocation"):
        TrainConfig(svd_allocation="sigma3")
    with pytest.raises(ValueError, match="refold_magnitudes"):
        TrainConfig(**dict(PRESETS["svd-cut"], refold_magnitudes="init_s"))        # Euclidean bases
    with pytest.raises(ValueError, match="refold_magnitudes"):
        TrainConfig.from_preset("bilevel", refold_magnitudes="layer_total")          # FW on s
    # "auto" (the default): layer_total where a refold applies (s held, SVD cut, oblique), else off
    assert TrainConfig().refold_mode() == "layer_total"
    assert TrainConfig(basis="euclidean").refold_mode() == "off"
    assert TrainConfig(fw_step_size=0.05).refold_mode() == "off"
    assert TrainConfig.from_preset("bilevel").refold_mode() == "off"
    with pytest.raises(ValueError, match="refold_magnitudes"):
        TrainConfig(refold_magnitudes="yes")
    cfg = TrainConfig(**dict(PRESETS["svd-cut"], basis="oblique", refold_magnitudes=True,
                             svd_allocation="sigma2_per_param"))
    assert cfg.refold_magnitudes == "init_s" and cfg.svd_allocation == "sigma2_per_param"


def test_sigma2_per_param_allocation_ranks_components_by_energy_per_parameter(tmp_path):
    """The key the count budget cuts by: σ²/(parameters per component) with sigma2_per_param, σ with
    sigma (each layer's σ of ΔW − ΔW0 for folded layers, float64 reference)."""
    from debora.train.loop import Trainer
    from debora.train.run import prepare, resolve_device
    from debora.train.config import PRESETS
    keys = {}
    for alloc in ("sigma", "sigma2_per_param"):
        cfg = tiny_config(tmp_path, **dict(PRESETS["svd-cut"], basis="oblique", svd_allocation=alloc,
                                           target_rank=1.0, output_dir=str(tmp_path / alloc)))
        model, task, d1, d2, ev, splits, info = prepare(cfg, resolve_device("cpu"))
        _trained_like(model, torch.Generator().manual_seed(3))
        trainer = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu"))
        layout = trainer.init_state().layout
        keys[alloc] = trainer.singular_key(layout, unfold=True).double()
        ref = []
        for name in layout.names:
            layer = debora.adapter_layers(model)[name[:-2]]
            E = (layer.delta_weight() - layer.unfold_delta()).double()
            sig = torch.linalg.svdvals(E)[:layer.rank] / layer.scaling
            ref.append(sig if alloc == "sigma" else sig ** 2 / (layer.adapter_numel() / layer.rank))
        torch.testing.assert_close(keys[alloc], torch.cat(ref), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("allocation", ["sigma", "sigma2_per_param", "uniform"])
def test_an_unfolded_cut_that_would_leave_the_budget_falls_back_to_the_folded_cut(tmp_path, allocation):
    """Under a tight per-layer τ, s = σ(ΔW − ΔW0) after an unfolded cut can exceed the budget (Σσ(E) is
    not bounded by Σs): the trainer warns, cuts ΔW instead (folded: Σσ(ΔW) ≤ Σs, Eckart–Young on ΔW)
    and the Frank-Wolfe state stays feasible; when the budget is loose the same cut unfolds."""
    from debora.train.loop import Trainer
    from debora.train.run import prepare, resolve_device
    for tau, expect_fold in ((0.6, True), (100.0, False)):
        cfg = tiny_config(tmp_path, basis="oblique", budget="per_layer", tau=tau, init_s=0.15,
                          fw_step="constant", fw_step_size=0.0, prune_by="svd", target_rank=1.0,
                          split="same", estimator="first-order", prune_start=0.0, prune_end=0.5,
                          svd_allocation=allocation, output_dir=str(tmp_path / f"fb{tau}"))
        model, task, d1, d2, ev, splits, info = prepare(cfg, resolve_device("cpu"))
        trainer = Trainer(model, cfg, task, d1, d2, ev, torch.device("cpu"))
        state = trainer.init_state()
        for layer in debora.adapter_layers(model).values():
            # every component along the top singular pair (u, v) of −ΔW0: ΔW = scaling Σs u vᵀ, so
            # σ1(ΔW − ΔW0)/scaling ≥ Σs + σ1(ΔW0)/scaling > Σs = 0.6 = τ: the unfolded survivor is too big
            P, _, Qh = torch.linalg.svd(-layer.unfold_delta())
            with torch.no_grad():
                layer.U.copy_(P[:, :1].expand_as(layer.U))
                layer.V.copy_(Qh[:1].T.expand_as(layer.V))
        state.iteration = trainer.total_iterations
        if expect_fold:
            with pytest.warns(RuntimeWarning, match="would leave the budget"):
                removed = trainer.truncate(state)
        else:
            removed = trainer.truncate(state)
        layers = debora.adapter_layers(model)
        assert removed == 3 * len(layers) and set(debora.rank_pattern(model).values()) == {1}
        assert all(l.folded == expect_fold for l in layers.values())
        S = state.fw_state.set
        assert S.feasibility_error(state.fw_state.x) is None


def test_the_uniform_svd_allocation_cuts_every_layer_to_the_same_rank(tmp_path):
    """svd_allocation="uniform" (the ablation of the allocation): a cut to target_rank 2 from r0 = 4
    leaves every layer at rank 2 (the global allocations may leave layers at 0 or 4), also when the cut
    is spread over several iterations (layers cut first are not cut again before the others)."""
    from debora.train.config import PRESETS
    res = _run(tmp_path, "uniform", **dict(PRESETS["svd-cut"], basis="oblique", init_rank=4, target_rank=2.0,
                                           svd_allocation="uniform", refold_magnitudes="layer_total",
                                           prune_start=0.2, prune_end=0.8))
    rec = [r for r in map(__import__("json").loads, open(tmp_path / "uniform" / "metrics.jsonl"))
           if r["kind"] == "train"]
    assert len({r["total_rank"] for r in rec}) > 3                      # a gradual cut, several steps
    assert set(debora.rank_pattern(res.model).values()) == {2}
    for layer in debora.adapter_layers(res.model).values():             # Σ s = r0 · init_s = 4
        torch.testing.assert_close(layer.s.detach(), torch.full((2,), 2.0))


def test_svd_unfold_false_cuts_the_folded_update(tmp_path):
    """svd_unfold=False (the ablation): the cut re-factorises ΔW itself, ΔW0 stays folded in every layer;
    refold_magnitudes needs the unfolded cut and says so."""
    from debora.train import TrainConfig
    from debora.train.config import PRESETS
    kw = dict(PRESETS["svd-cut"], basis="oblique", init_rank=4, target_rank=1.0, svd_unfold=False)
    with pytest.raises(ValueError, match="svd_unfold"):
        TrainConfig(**dict(kw, refold_magnitudes="init_s"))
    res = _run(tmp_path, "folded", **kw)
    layers = debora.adapter_layers(res.model)
    assert sum(debora.rank_pattern(res.model).values()) == len(layers)
    assert all(l.folded and not l.refolded for l in layers.values())


# -- the budget in parameters, and the allocation over layers (budget.py) -----------------------------
def test_smallest_beyond_with_costs_removes_the_shortest_prefix_that_fits_the_parameter_budget():
    s = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4], dtype=torch.float64)
    cost = torch.tensor([10.0, 30.0, 10.0, 30.0, 10.0], dtype=torch.float64)
    alive = torch.ones(5, dtype=torch.bool)
    none = torch.zeros(5, dtype=torch.bool)
    # live cost 90, keep 65: excess 25 -> the smallest s (0.1, cost 30) alone covers it
    assert smallest_beyond(s, alive, 65, none, cost=cost).tolist() == [False, True, False, False, False]
    # keep 30: excess 60 -> 0.1 (30), 0.2 (30): exactly 60, no third one
    assert smallest_beyond(s, alive, 30, none, cost=cost).tolist() == [False, True, False, True, False]
    # keep 29: excess 61 -> 0.1, 0.2 and 0.3 (70 removed, 20 left <= 29)
    assert smallest_beyond(s, alive, 29, none, cost=cost).tolist() == [False, True, True, True, False]
    # a protected component is never taken, even when the budget cannot be met without it
    protected = torch.tensor([True, False, False, False, False])
    assert smallest_beyond(s, alive, 0, protected, cost=cost).tolist() == [False, True, True, True, True]
    assert not smallest_beyond(s, alive, 90, none, cost=cost).any()          # already within budget


def test_allocation_keys_order_components_as_documented():
    from debora.train.budget import allocation_key
    s = torch.tensor([0.9, 0.1, 0.5, 0.02, 0.3, 0.6], dtype=torch.float64)
    blocks = [slice(0, 3), slice(3, 4), slice(4, 6)]         # ranks 3, 1, 2
    torch.testing.assert_close(allocation_key(s, blocks, "global"), s)
    alive = torch.ones(6, dtype=torch.bool)
    protected = torch.tensor([True, False, False, True, False, True])      # each block's largest
    key = allocation_key(s, blocks, "uniform")
    # uniform: the rank-3 block loses its smallest (0.1) first, then the rank-2 blocks' smallest: the
    # first block's 0.5 and the third's 0.3 are both second in their blocks, and 0.3 < 0.5 goes first
    assert smallest_beyond(key, alive, 5, protected).tolist() == [False, True, False, False, False, False]
    assert smallest_beyond(key, alive, 4, protected).tolist() == [False, True, False, False, True, False]
    assert smallest_beyond(key, alive, 3, protected).tolist() == [False, True, True, False, True, False]
    # global on the same s would take 0.02's block first if it were not protected: 0.1, then 0.3
    assert smallest_beyond(s, alive, 4, protected).tolist() == [False, True, False, False, True, False]
    cost = torch.tensor([1.0, 1.0, 1.0, 100.0, 4.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(allocation_key(s, blocks, "s2_per_param", cost), s ** 2 / cost)
    with pytest.raises(ValueError, match="needs each component's cost"):
        allocation_key(s, blocks, "s2_per_param")


def test_target_params_and_prune_allocation_validation(tmp_path):
    from debora.train import TrainConfig
    for bad in (0, -5, 1.5, True, "many"):      # a wrong type is a TypeError (config_checks), a range ValueError
        with pytest.raises((ValueError, TypeError), match="target_params"):
            TrainConfig(target_params=bad)
    with pytest.raises(ValueError, match="prune_allocation"):
        TrainConfig(prune_allocation="by-size")
    with pytest.raises(ValueError, match="prune_allocation='uniform' orders components by s"):
        TrainConfig(prune_allocation="uniform", prune_by="svd")
    # below one component per adapter (per-layer budget): refused before training, naming the least size
    with pytest.raises(ValueError, match=r"target_params=100 is below the smallest adapter .* \(\d+ parameters"):
        _run(tmp_path, "too_small", basis="oblique", init_s=0.01, target_params=100)
    assert not (tmp_path / "too_small").exists()          # refused before the output directory is written


@pytest.mark.slow
def test_a_parameter_budget_lands_on_its_target_and_the_size_is_monotone_in_it(tmp_path):
    """target_params: the final adapter costs at most P* and less than one component below it (from
    P0 = 4 × 908 = 3,632; one component per layer costs 908 in all), for three budgets, monotone in P*;
    target_rank (set too) is not used."""
    sizes = []
    for budget in (1200, 2000, 2800):
        res = _run(tmp_path, f"p{budget}", basis="oblique", init_s=0.01, target_rank=3.0, target_params=budget)
        layers = debora.adapter_layers(res.model)
        costs = {layer.component_numel() for layer in layers.values()}
        size = sum(layer.adapter_numel() for layer in layers.values())
        assert size == res.summary["adapter_end"]
        assert budget - max(costs) < size <= budget, (budget, size, costs)
        assert f"| budget | target_params {budget:,} adapter parameters (ended at {size:,}," in \
            (tmp_path / f"p{budget}" / "summary.md").read_text()
        assert all(torch.isfinite(p).all() for p in res.model.parameters())
        sizes.append(size)
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("target", [dict(target_rank=2.0), dict(target_params=1500)])
def test_the_uniform_allocation_leaves_every_layer_at_the_same_rank(tmp_path, target):
    """prune_allocation="uniform": the ranks of all layers differ by at most one at every point of the
    schedule (and are equal at a count budget that divides evenly), while "global" lets them spread."""
    import json
    res = _run(tmp_path, "uniform", basis="oblique", init_s=0.01, prune_allocation="uniform",
               prune_start=0.2, prune_end=0.8, **target)
    ranks = set(debora.rank_pattern(res.model).values())
    assert max(ranks) - min(ranks) <= 1
    if "target_rank" in target:
        assert ranks == {2}
        assert "| budget | target_rank 2 (24 components over 12 adapters) |" in \
            (tmp_path / "uniform" / "summary.md").read_text()
    rec = [r for r in map(json.loads, open(tmp_path / "uniform" / "metrics.jsonl")) if r["kind"] == "train"]
    assert len({r["total_rank"] for r in rec}) > 3                      # a gradual cut, several steps
    # the same run with the global allocation spreads the ranks (seen: 1 to 4 and 1 to 3)
    spread = _run(tmp_path, "global", basis="oblique", init_s=0.01, prune_start=0.2, prune_end=0.8, **target)
    spread_ranks = debora.rank_pattern(spread.model).values()
    assert max(spread_ranks) - min(spread_ranks) >= 2


def test_the_oblique_svd_preset_on_the_packaged_cnn_cuts_gradually_to_a_parameter_budget(tmp_path, monkeypatch):
    """`--preset oblique-svd` (images, round 11): oblique CP adapters from r0 with s held at 1, cut by the
    SVD of what training changed over several iterations of the 10-70% window, σ² per parameter over all
    layers; with target_params the final adapter lands at most one component below the budget, and the
    survivors of every cut layer share its initial Σs = r0 (refold layer_total)."""
    import json
    from debora.train import TrainConfig
    from debora.train.config import PRESETS
    from test_train_tiny import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, train=96, test=16)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    common = dict(dataset="fashion-mnist", init_rank=4, epochs=2.0, batch_size=8, image_size=32, eval_every=0,
                  progress=False, plots=False, seed=0, device="cpu")
    start = TrainConfig(**dict(PRESETS["oblique-svd"], **common, output_dir=str(tmp_path / "probe"),
                               max_iterations=1, target_rank=None))
    layers = debora.adapter_layers(train(start).model)
    costs = [layer.component_numel() for layer in layers.values()]
    budget = 2 * sum(costs)                     # half of r0 = 4's size
    cfg = TrainConfig(**dict(PRESETS["oblique-svd"], **common, target_params=budget,
                             output_dir=str(tmp_path / "run")))
    res = train(cfg)
    layers = debora.adapter_layers(res.model)
    size = sum(layer.adapter_numel() for layer in layers.values())
    assert budget - max(costs) < size <= budget
    rec = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert len({r["total_rank"] for r in rec}) > 3                      # a gradual cut, several steps
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    for layer in layers.values():
        if 0 < layer.rank < 4:
            torch.testing.assert_close(layer.s.detach().sum().double(), torch.tensor(4.0, dtype=torch.float64))


def test_the_cli_uses_the_image_preset_for_image_tasks_without_a_preset(capsys):
    from debora.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["train", "--dataset", "fashion-mnist"]))
    assert cfg.preset == "oblique-svd" and cfg.prune_by == "svd" and cfg.init_s == 1.0
    assert "using --preset oblique-svd" in capsys.readouterr().err
    cfg = config_from_args(build_parser().parse_args(["train", "--dataset", "x.csv", "--task", "image"]))
    assert cfg.preset == "oblique-svd"
    for argv in (["train", "--dataset", "fashion-mnist", "--preset", "default"], ["train"],
                 ["train", "--dataset", "x.csv"]):
        cfg = config_from_args(build_parser().parse_args(argv))
        assert cfg.preset in (None, "default") and cfg.prune_by == "svd" and cfg.init_s == 0.1
        assert cfg.fw_step_size == 0.0 and cfg.refold_mode() == "layer_total"


def test_an_image_task_with_the_text_default_warns_and_names_the_image_preset(tmp_path, monkeypatch):
    import warnings
    from debora.train import TrainConfig
    from debora.train.run import prepare
    from test_train_tiny import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, train=32, test=8)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    common = dict(dataset="fashion-mnist", image_size=32, device="cpu", output_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"from_preset\('oblique-svd'"):
        prepare(TrainConfig(**common), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*oblique-svd.*")
        prepare(TrainConfig.from_preset("oblique-svd", **common), torch.device("cpu"))


# -- the round-12 default: s held at init_s, the budget cut by the SVD of what training changed -------
def _default_selection():
    """The fields that choose ranks, at TrainConfig's defaults (so the test follows the defaults)."""
    from debora.train import TrainConfig
    d = TrainConfig()
    names = ("basis", "budget", "tau", "init_rank", "init_s", "fw_step", "fw_step_size", "prune_by",
             "svd_allocation", "svd_unfold", "refold_magnitudes", "prune_start", "prune_end", "split",
             "estimator", "lr_schedule")
    return {k: getattr(d, k) for k in names}


@pytest.mark.parametrize("budget", [dict(target_rank=2.0), dict(target_rank=None, target_params=1500)])
def test_the_default_holds_s_cuts_by_svd_and_resumes_exactly(tmp_path, budget):
    """With the defaults (s held at 0.1, no Frank-Wolfe step, the unfolded SVD cut by σ² per parameter,
    refold layer_total) a tiny BERT run lands on the budget: 2 components per adapter on average (count), or
    at most one component's cost below P* (parameters); every cut layer's survivors share the layer's
    initial Σs = r0·init_s exactly, the uncut layers keep s = init_s; and a run stopped after the
    cuts resumes bit for bit. (The count is an average: σ² per parameter spreads it over layers.)"""
    sel = dict(_default_selection(), init_rank=4, **budget)
    assert sel["fw_step_size"] == 0.0 and sel["prune_by"] == "svd" and sel["init_s"] == 0.1
    kw = dict(sel, epochs=2.0, max_iterations=12, eval_every=0, checkpoint_every=4, truncate_from=0.1)
    a = train(tiny_config(tmp_path, output_dir=str(tmp_path / "full"), **kw))
    assert a.trainer.cfg.refold_mode() == "layer_total"
    layers = debora.adapter_layers(a.model)
    if budget.get("target_rank"):
        assert sum(layer.rank for layer in layers.values()) == 2 * len(layers)
        assert all(layer.rank >= 1 for layer in layers.values())       # a per-layer budget keeps one
    else:
        size = sum(layer.adapter_numel() for layer in layers.values())
        most = max(layer.component_numel() for layer in layers.values())
        assert 1500 - most < size <= 1500
    for layer in layers.values():
        total = torch.tensor(4 * 0.1, dtype=torch.float64)
        if layer.rank < 4:      # cut and refolded: the survivors share the layer's initial sum
            torch.testing.assert_close(layer.s.detach().double().sum(), total, rtol=1e-6, atol=0)
            assert torch.allclose(layer.s.detach(), layer.s.detach()[0].expand_as(layer.s))
        else:                   # never cut: s untouched at init_s
            assert torch.equal(layer.s.detach(), torch.full_like(layer.s, 0.1))

    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "split"), **kw)
    _train_until(cfg, 9)
    b = train(cfg.replace(resume="auto"))
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
