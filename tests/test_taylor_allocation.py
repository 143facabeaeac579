"""svd_allocation="taylor" (debora/train/sensitivity.py): the first-order cost of removing each SVD
component, checked in float64 against the exact change of a loss that is linear in W (first order is
then exact), on Linear, GPT-2 Conv1D and 1×1 CP conv adapters, folded and unfolded; and in training."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import debora
from debora.layers import make_adapter
from debora.refactor import _svd
from debora.train.sensitivity import removal_costs, weight_gradients
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)

D = torch.float64


def _layer(kind: str, basis: str, seed: int):
    torch.manual_seed(seed)
    base = {"linear": lambda: nn.Linear(7, 5), "conv1d": lambda: Conv1D(5, 7),
            "conv": lambda: nn.Conv2d(7, 5, 1)}[kind]().to(D)
    base.requires_grad_(False)                         # frozen, as debora.inject leaves it
    layer = make_adapter("m", base, basis, 1.7)
    gen = torch.Generator().manual_seed(seed)
    layer.init_(3, 0.5, gen)
    with torch.no_grad():   # a trained-looking update: every basis random, s spread out
        for b in layer.basis_names:
            getattr(layer, b).copy_(torch.randn(getattr(layer, b).shape, generator=gen, dtype=D))
        layer.s.copy_(torch.tensor([0.9, 0.4, 0.2], dtype=D))
    return layer


def _input(kind, gen):
    return torch.randn((4, 7, 2, 3) if kind == "conv" else (4, 7), generator=gen, dtype=D)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv"])
@pytest.mark.parametrize("basis,unfold", [("euclidean", False), ("oblique", False), ("oblique", True)])
def test_removal_costs_are_the_exact_change_of_a_loss_linear_in_w(kind, basis, unfold):
    gen = torch.Generator().manual_seed(11)
    layer = _layer(kind, basis, 3)
    x = _input(kind, gen)
    c = torch.randn(layer(x).shape, generator=gen, dtype=D)

    def loss_of(batch):      # linear in the layer's weight: the first-order Taylor cost is exact
        return (layer(batch) * c).sum()
    grads = weight_gradients({"m": layer}, [x, 2 * x], loss_of)
    assert not layer.weight_ref.requires_grad          # restored
    torch.testing.assert_close(grads["m"].double(),
                               torch.autograd.functional.jacobian(
                                   lambda w: ((torch.func.functional_call(layer.base, {"weight": w},
                                                                           (1.5 * x,)) * c).sum()),
                                   layer.weight_ref.detach()), rtol=1e-5, atol=1e-5)
    cost = removal_costs(layer, grads["m"].double(), unfold)
    P, sig, Q = _svd(layer, unfold)
    base_loss = 0.5 * (loss_of(x) + loss_of(2 * x))
    for j in range(layer.rank):
        removed = layer.scaling * sig[j] * torch.outer(P[:, j], Q[:, j])     # out × in
        if kind == "conv1d":
            removed = removed.T
        w = layer.weight_ref.detach() - removed.reshape(layer.weight_ref.shape)
        after = 0.5 * sum((torch.func.functional_call(layer, {"base.weight": w}, (b,)) * c).sum()
                          for b in (x, 2 * x))
        torch.testing.assert_close(cost[j], (after - base_loss).detach(), rtol=1e-4, atol=1e-4)


def test_a_component_that_lowers_the_loss_when_removed_goes_first(tmp_path):
    """The key is signed: a component the loss wants gone (Δf1 < 0) is cut before one it wants kept."""
    layer = _layer("linear", "euclidean", 5)
    P, sig, Q = _svd(layer)
    G = torch.outer(P[:, 0], Q[:, 0]) - torch.outer(P[:, 2], Q[:, 2])   # f1 rises along 1, falls along 3
    cost = removal_costs(layer, G)
    assert cost[0] < 0 < cost[2] and abs(float(cost[1])) < 1e-12


@pytest.mark.slow
def test_training_with_the_taylor_allocation_reaches_the_budget_and_refreshes_the_gradient(tmp_path):
    from debora.train import train
    from debora.train.config import PRESETS
    refreshed = []

    def spy(trainer, state, extra):
        g = getattr(trainer, "_taylor_grads", None)
        if g is not None and (not refreshed or refreshed[-1] != g["iteration"]):
            refreshed.append(g["iteration"])
    cfg = tiny_config(tmp_path, **dict(PRESETS["oblique-svd"], init_rank=4, target_rank=1.0, epochs=4.0,
                                       eval_every=0, svd_allocation="taylor", taylor_batches=2,
                                       taylor_refresh=0.25, output_dir=str(tmp_path / "taylor")))
    res = train(cfg, callback=spy)
    layers = debora.adapter_layers(res.model)
    assert sum(debora.rank_pattern(res.model).values()) == len(layers)          # target 1 per layer
    total = res.summary.get("iterations") or max(
        r["iteration"] for r in map(json.loads, open(tmp_path / "taylor" / "metrics.jsonl")))
    every = round(0.25 * total)
    assert len(refreshed) >= 2 and all(b - a >= every for a, b in zip(refreshed, refreshed[1:]))
    assert all(not l.weight_ref.requires_grad for l in layers.values())


def test_taylor_options_are_validated():
    from debora.train import TrainConfig
    with pytest.raises(ValueError, match="taylor_batches"):
        TrainConfig(taylor_batches=0)
    with pytest.raises(ValueError, match="taylor_refresh"):
        TrainConfig(taylor_refresh=1.5)
    assert TrainConfig(svd_allocation="taylor").svd_allocation == "taylor"
