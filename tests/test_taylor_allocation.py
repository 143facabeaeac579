"""svd_allocation="taylor" (debora/train/sensitivity.py): the first-order cost of removing each SVD
component, checked in float64 against the exact change of a loss that is linear in W (first order is
then exact), on Linear, GPT-2 Conv1D and 1×1 CP conv adapters, folded and unfolded; svd_allocation="fisher":
its Kronecker factors against per-example gradients and its cost against the explicit Kronecker form; both
in training."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import debora
from debora.layers import make_adapter
from debora.refactor import layer_svd
from debora.train.sensitivity import kronecker_factors, removal_costs, weight_gradients
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
    P, sig, Q = layer_svd(layer, unfold)
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
    P, sig, Q = layer_svd(layer)
    G = torch.outer(P[:, 0], Q[:, 0]) - torch.outer(P[:, 2], Q[:, 2])   # f1 rises along 1, falls along 3
    cost = removal_costs(layer, G)
    assert cost[0] < 0 < cost[2] and abs(float(cost[1])) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["taylor", "fisher"])
def test_training_with_a_taylor_allocation_reaches_the_budget_and_refreshes_its_statistics(tmp_path, allocation):
    """Ḡ ("taylor") or the Fisher's factors ("fisher"), recomputed no sooner than taylor_refresh apart; the
    run lands on the budget and leaves the base weights frozen."""
    from debora.train import train
    from debora.train.config import PRESETS
    refreshed = []

    def spy(trainer, state, extra):
        g = getattr(trainer, "_sensitivity", None)
        if g is not None and (not refreshed or refreshed[-1] != g["iteration"]):
            refreshed.append(g["iteration"])
            if allocation == "fisher":     # (A, S): square, positive semi-definite diagonals
                assert all(A.shape[0] == A.shape[1] and torch.all(torch.diagonal(A) >= 0)
                           and torch.all(torch.diagonal(S) >= 0) for A, S in g["data"].values())
    cfg = tiny_config(tmp_path, **dict(PRESETS["oblique-svd"], init_rank=4, target_rank=1.0, epochs=4.0,
                                       eval_every=0, svd_allocation=allocation, taylor_batches=2,
                                       taylor_refresh=0.25, output_dir=str(tmp_path / allocation)))
    res = train(cfg, callback=spy)
    layers = debora.adapter_layers(res.model)
    assert sum(debora.rank_pattern(res.model).values()) == len(layers)          # target 1 per layer
    total = res.summary.get("iterations") or max(
        r["iteration"] for r in map(json.loads, open(tmp_path / allocation / "metrics.jsonl")))
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


# ---------------------------------------------------------------- second order: svd_allocation="fisher"

@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv", "conv_strided"])
def test_kronecker_factors_are_the_input_and_per_example_gradient_second_moments(kind):
    """A = mean over positions of x xᵀ; S = mean over examples of Σ_t δ_t δ_tᵀ with δ the gradient of the
    example's *own* loss (computed here one example at a time), for a loss that is the batch mean."""
    gen = torch.Generator().manual_seed(5)
    if kind == "conv_strided":        # a 1×1 conv with stride 2 and padding 1: the positions it reads
        torch.manual_seed(2)
        base = nn.Conv2d(7, 5, 1, stride=2, padding=1).to(D)
        base.requires_grad_(False)
        layer = make_adapter("m", base, "oblique", 1.7)
        layer.init_(3, 0.5, torch.Generator().manual_seed(2))
        x = torch.randn(4, 7, 5, 4, generator=gen, dtype=D)
    else:
        layer = _layer(kind, "oblique", 2)
        x = torch.randn((4, 7, 2, 3) if kind == "conv" else (4, 3, 7), generator=gen, dtype=D)
    c = torch.randn(layer(x).shape[1:], generator=gen, dtype=D)

    def per_example(y):               # a non-linear loss of one example's output
        return torch.log1p(((y * c).sum()) ** 2) + (y ** 3 * c).sum() / 7

    def loss_of(b):
        return torch.stack([per_example(y) for y in layer(b)]).mean()
    batches = [x, x.flip(0) * 0.5]
    factors = kronecker_factors({"m": layer}, batches, loss_of)
    A, S = factors["m"]
    assert not layer.weight_ref.requires_grad               # restored
    xs, ss, n_pos, n_ex = 0, 0, 0, 0
    for b in batches:
        read = torch.nn.functional.pad(b, (1, 1, 1, 1))[:, :, ::2, ::2] if kind == "conv_strided" else b
        rows = read.permute(0, 2, 3, 1).reshape(-1, 7) if b.dim() == 4 else read.reshape(-1, 7)
        xs, n_pos = xs + rows.T @ rows, n_pos + rows.shape[0]
        for i in range(b.shape[0]):                   # δ of example i's own loss at the base output
            xi = b[i:i + 1]
            y = layer.base(xi).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(per_example((y + (layer(xi) - layer.base(xi)).detach())[0]), y)
            g = g.permute(0, 2, 3, 1).reshape(-1, 5) if g.dim() == 4 else g.reshape(-1, 5)
            ss, n_ex = ss + g.T @ g, n_ex + 1
    torch.testing.assert_close(A, xs / n_pos, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, ss / n_ex, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("unfold", [False, True])
def test_curvature_costs_are_the_kronecker_fisher_quadratic_form_of_each_removed_component(unfold):
    """½ vec(ΔW_j)ᵀ (A ⊗ S) vec(ΔW_j) for ΔW_j = scaling·σ_j u_j v_jᵀ, against the explicit Kronecker
    product in float64; with one example at one position A ⊗ S is the empirical Fisher g gᵀ exactly."""
    from debora.train.sensitivity import curvature_costs
    layer = _layer("linear", "oblique", 7)
    gen = torch.Generator().manual_seed(3)
    a, s = torch.randn(7, 7, generator=gen, dtype=D), torch.randn(5, 5, generator=gen, dtype=D)
    A, S = a @ a.T, s @ s.T
    cost = curvature_costs(layer, (A, S), unfold)
    P, sig, Q = layer_svd(layer, unfold)
    K = torch.kron(A, S)                                    # vec (column-major) of an out × in matrix
    for j in range(layer.rank):
        d = (layer.scaling * sig[j] * torch.outer(P[:, j], Q[:, j])).T.reshape(-1)
        torch.testing.assert_close(cost[j], 0.5 * d @ K @ d, rtol=1e-10, atol=1e-12)
    x = torch.randn(1, 7, generator=gen, dtype=D)
    (A1, S1), = kronecker_factors({"m": layer}, [x], lambda b: torch.sin(layer(b)).sum()).values()
    g = torch.autograd.functional.jacobian(
        lambda w: torch.sin(torch.func.functional_call(layer, {"base.weight": w}, (x,))).sum(),
        layer.weight_ref.detach())
    cost1 = curvature_costs(layer, (A1, S1), unfold)
    for j in range(layer.rank):
        dW = layer.scaling * sig[j] * torch.outer(P[:, j], Q[:, j])
        torch.testing.assert_close(cost1[j], 0.5 * (dW * g).sum() ** 2, rtol=1e-9, atol=1e-12)
