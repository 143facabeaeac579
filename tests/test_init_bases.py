"""init_bases (docs/rank_selection.md round 19): oblique/Stiefel bases started along each base weight's
leading ("principal", PiSSA's directions) or trailing ("minor", MiLoRA's) singular vectors instead of random
ones, at the same magnitude s0 with ΔW0 folded, so the model is unchanged at start. Checked in float64
against torch.linalg.svd of the weight: the bases are its singular vectors (up to sign), the model's output
is unchanged, CP adapters take A / B from the kernel's mode unfoldings, bad requests are refused before the
model changes, and a run saves, reloads and resumes bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import debora
from debora.train import TrainConfig, train
from test_rank_selection import assert_resumes_and_reloads
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)

TOL = 1e-12     # float64: the fold W − ΔW0 + ΔW0 rounds at ~|W|·1e-16


def _same_columns(X, Y):
    """|diag(XᵀY)| = 1 for unit columns: the same directions up to sign."""
    return torch.allclose((X.transpose(0, 1) @ Y).diagonal().abs(), torch.ones(X.shape[1], dtype=X.dtype),
                          atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), data=st.data(),
       which=st.sampled_from(["principal", "minor"]), basis=st.sampled_from(["oblique", "stiefel"]))
def test_matrix_bases_are_the_weights_singular_vectors_and_the_output_is_unchanged(m, n, data, which, basis):
    r = data.draw(st.integers(1, min(m, n)))
    torch.manual_seed(m * 100 + n)
    net = nn.Sequential(nn.Linear(n, m), nn.Tanh(), nn.Linear(m, 3)).double()
    x = torch.randn(4, n, dtype=torch.float64)
    with torch.no_grad():
        y0 = net(x)
    W = net[0].weight.detach().clone()
    debora.inject(net, debora.DeboraConfig(target_modules=["0"], init_rank=r, basis=basis, init_s=0.3,
                                           init_bases=which))
    L, S, Rh = torch.linalg.svd(W, full_matrices=False)
    idx = slice(0, r) if which == "principal" else slice(min(m, n) - r, min(m, n))
    layer = net[0]
    assert _same_columns(layer.U.detach(), L[:, idx]) and _same_columns(layer.V.detach(), Rh[idx].T)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y0, atol=TOL, rtol=0)
    # the folded ΔW0 is scaling·s0·Σ l_j r_jᵀ over the chosen j
    torch.testing.assert_close(layer.unfold_delta(),
                               layer.scaling * 0.3 * L[:, idx] @ Rh[idx], atol=TOL, rtol=0)


def test_conv1d_bases_follow_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(5, 7)).double()       # y = x W + b, W [in=7, out=5]
    W = net[0].weight.detach().clone()
    debora.inject(net, debora.DeboraConfig(target_modules=["0"], init_rank=2, basis="oblique", init_s=0.2,
                                           init_bases="principal"))
    L, _, Rh = torch.linalg.svd(W.T, full_matrices=False)          # the [out, in] matrix
    assert _same_columns(net[0].U.detach(), L[:, :2]) and _same_columns(net[0].V.detach(), Rh[:2].T)


@pytest.mark.parametrize("kernel", [1, 3])
def test_cp_bases_come_from_the_kernels_mode_unfoldings(kernel):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(6, 5, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv2d(5, 4, 1)).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y0 = net(x)
    K = net[0].weight.detach().clone()
    debora.inject(net, debora.DeboraConfig(target_modules=["0"], init_rank=3, basis="oblique", init_s=0.5,
                                           init_bases="principal"))
    layer = net[0]
    A_ref = torch.linalg.svd(K.reshape(5, -1), full_matrices=False)[0][:, :3]
    B_ref = torch.linalg.svd(K.transpose(0, 1).reshape(6, -1), full_matrices=False)[0][:, :3]
    assert _same_columns(layer.A.detach(), A_ref) and _same_columns(layer.B.detach(), B_ref)
    if kernel == 1:      # one SVD of the [out, in] matrix: paired vectors, C = D = 1
        L, S, Rh = torch.linalg.svd(K[:, :, 0, 0], full_matrices=False)
        assert torch.equal(layer.C.detach(), torch.ones(1, 3, dtype=torch.float64))
        assert torch.equal(layer.D.detach(), torch.ones(1, 3, dtype=torch.float64))
        delta = layer.unfold_delta()[:, :, 0, 0]
        torch.testing.assert_close(delta, layer.scaling * 0.5 * L[:, :3] @ Rh[:3], atol=TOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y0, atol=TOL, rtol=0)


def test_random_stays_the_default_and_draws_the_same_bases_as_before():
    """init_bases='random' is the default and takes the generator's draws exactly as before the option
    existed (the seeded runs of every earlier round stay reproducible)."""
    from debora.layers import make_adapter
    from debora import manifolds
    assert debora.DeboraConfig(target_modules=["0"]).init_bases == "random"
    assert TrainConfig().init_bases == "random"
    lin = nn.Linear(6, 5).double()
    layer = make_adapter("0", copy.deepcopy(lin), "oblique", 2.0)
    layer.init_(3, 0.2, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    U = manifolds.random_point("oblique", 5, 3, g, torch.float64)
    V = manifolds.random_point("oblique", 6, 3, g, torch.float64)
    assert torch.equal(layer.U.detach(), U) and torch.equal(layer.V.detach(), V)


def test_bad_requests_are_refused_by_name_before_the_model_changes():
    with pytest.raises(ValueError, match="init_bases must be one of"):
        debora.DeboraConfig(target_modules=["0"], basis="oblique", init_bases="pissa")
    with pytest.raises(ValueError, match="basis='euclidean'"):
        debora.DeboraConfig(target_modules=["0"], basis="euclidean", init_bases="principal")
    with pytest.raises(ValueError, match="init_bases='principal' needs basis oblique or stiefel"):
        TrainConfig(basis="euclidean", init_bases="principal")
    with pytest.raises(ValueError, match="init_bases='minor ' is not one of"):
        TrainConfig(init_bases="minor ")
    # a 3×3 conv with 2 input channels has 2 mode-1 singular vectors: init_rank 3 is refused, model untouched
    net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.Linear(4, 4))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"init_bases='principal' needs init_rank <= 2 for '0'"):
        debora.inject(net, debora.DeboraConfig(target_modules=["0", "1"], init_rank=3, basis="oblique",
                                               init_bases="principal"))
    assert not debora.adapter_layers(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_the_cli_flag_sets_init_bases():
    from debora.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["train", "--init-bases", "principal"]))
    assert cfg.init_bases == "principal"
    assert config_from_args(build_parser().parse_args(["train"])).init_bases == "random"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["principal", "minor"])
def test_a_run_from_singular_bases_lands_on_its_budget_saves_reloads_and_resumes(tmp_path, which):
    """The default's regime (oblique, s held, SVD cut, refold) from singular-vector bases: the run lands on
    its budget, its saved adapter reloads onto a fresh base model with the same outputs, and a resume after
    the cut ends bit for bit where the uninterrupted run did."""
    kw = dict(estimator="first-order", budget="per_layer", basis="oblique", split="same", fw_step="constant",
              fw_step_size=0.0, tau=1.0, init_s=0.1, target_rank=1.0, prune_by="svd",
              svd_allocation="sigma2_per_param", refold_magnitudes="auto", prune_start=0.2, prune_end=0.5,
              truncate_from=0.1, eval_every=0, lr_schedule="linear", init_bases=which, epochs=2.0,
              max_iterations=12, checkpoint_every=4, output_dir=str(tmp_path / "full"))
    a = train(tiny_config(tmp_path, **kw))
    layers = debora.adapter_layers(a.model)
    assert sum(debora.rank_pattern(a.model).values()) == len(layers)       # target 1 per adapter
    assert a.trainer.cfg.init_bases == which
    assert_resumes_and_reloads(a, tiny_config(tmp_path, **dict(kw, output_dir=str(tmp_path / "split"))),
                               tmp_path, stop_after=9)
