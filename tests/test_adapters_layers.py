"""Adapter layers equal their dense formulas (float64), merge/truncation/manifold behaviour."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import debora
from debora import manifolds
from debora.layers import CPConv2dAdapter, MatrixAdapter

D = torch.float64


def _randomise(layer, gen, floor=0.0):
    with torch.no_grad():
        for b in layer.basis_names:
            getattr(layer, b).copy_(torch.randn(getattr(layer, b).shape, generator=gen, dtype=D))
        layer.s.copy_(torch.rand(layer.rank, generator=gen, dtype=D) + 0.1 + floor)


def _wrap(base, r, basis="euclidean", scaling=1.7, seed=0):
    from debora.layers import make_adapter
    layer = make_adapter("m", base, basis, scaling)
    layer.init_(r, 0.5, torch.Generator().manual_seed(seed))
    return layer


@given(n_in=st.integers(1, 9), n_out=st.integers(1, 9), r=st.integers(1, 9), lead=st.integers(1, 3),
       transposed=st.booleans(), seed=st.integers(0, 10_000))
def test_matrix_adapter_equals_dense(n_in, n_out, r, lead, transposed, seed):
    r = min(r, n_in, n_out)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = (Conv1D(n_out, n_in) if transposed else nn.Linear(n_in, n_out)).to(D)
    W0 = base.weight.detach().clone()
    layer = _wrap(base, r, seed=seed)
    _randomise(layer, gen)
    x = torch.randn(lead, 3, n_in, generator=gen, dtype=D)
    dW = layer.scaling * layer.U @ torch.diag(layer.s) @ layer.V.T               # out × in
    W = W0.T if transposed else W0                                                # out × in
    expected = x @ (W + dW).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), dW.T if transposed else dW)


@given(cin=st.integers(1, 4), cout=st.integers(1, 4), kh=st.integers(1, 3), kw=st.integers(1, 3),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), r=st.integers(1, 6), seed=st.integers(0, 10_000),
       same=st.booleans())
def test_cp_conv_equals_dense_cp_kernel(cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, r, seed, same):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if same:
        base = nn.Conv2d(cin, cout, (kh, kw), padding="same", dilation=(dh, dw)).to(D)
    else:
        base = nn.Conv2d(cin, cout, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw)).to(D)
    W0 = base.weight.detach().clone()
    layer = _wrap(base, min(r, layer_max(base)), seed=seed)
    _randomise(layer, gen)
    H, Wd = 7 + dh * kh, 6 + dw * kw
    x = torch.randn(2, cin, H, Wd, generator=gen, dtype=D)
    K = layer.scaling * torch.einsum("i,oi,ci,pi,qi->ocpq", layer.s, layer.A, layer.B, layer.C, layer.D)
    expected = F.conv2d(x, W0 + K, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(layer(x), expected, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(layer.delta_weight(), K)


@pytest.mark.parametrize("stride, padding, static", [((1, 1), 0, False), ((2, 1), 0, False),
                                                     ((1, 1), "same", False), ((1, 1), 0, True)])
def test_pointwise_cp_conv_path_equals_the_dense_kernel_with_its_gradients(stride, padding, static):
    """1×1 unpadded convs take the two-conv path (layer.pointwise): output and the gradients of every
    factor and of s equal those of the dense convolution with W0 + ΔK, in float64."""
    torch.manual_seed(0)
    base = (_StaticSame(5, 6, 1) if static else nn.Conv2d(5, 6, 1, stride=stride, padding=padding)).to(D)
    if static:
        base.static_padding = nn.Identity()
    W0 = base.weight.detach().clone()
    layer = _wrap(base, 4)
    assert layer.pointwise
    _randomise(layer, torch.Generator().manual_seed(1))
    layer.s.requires_grad_(True)
    x = torch.randn(3, 5, 7, 6, dtype=D)
    wts = torch.randn(3, 6, *F.conv2d(x, W0, stride=base.stride).shape[2:], dtype=D)
    (layer(x) * wts).sum().backward()
    got = {n: getattr(layer, n).grad.clone() for n in ("s",) + layer.basis_names}
    leaves = {n: getattr(layer, n).detach().clone().requires_grad_(True) for n in got}
    K = layer.scaling * torch.einsum("i,oi,ci,pi,qi->ocpq", *(leaves[n] for n in ("s", "A", "B", "C", "D")))
    ref = F.conv2d(x, W0 + K, base.bias, base.stride)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    (ref * wts).sum().backward()
    for n, g in got.items():
        torch.testing.assert_close(g, leaves[n].grad, rtol=1e-11, atol=1e-11)


def layer_max(base):
    return CPConv2dAdapter(base, "euclidean", 1.0).max_rank()


def test_grouped_conv_and_padding_mode_refused():
    with pytest.raises(ValueError, match="groups=2"):
        CPConv2dAdapter(nn.Conv2d(4, 4, 3, groups=2), "euclidean", 1.0, name="dw")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        CPConv2dAdapter(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "euclidean", 1.0)


@pytest.mark.parametrize("basis", ["euclidean", "oblique", "stiefel"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv"])
def test_init_is_identity_and_merge_equals_unmerged(basis, kind):
    torch.manual_seed(0)
    base = {"linear": nn.Linear(6, 5), "conv1d": Conv1D(5, 6), "conv": nn.Conv2d(3, 5, 3, padding=1)}[kind]
    base = base.to(D)
    x = torch.randn(4, 3, 6, 6, dtype=D) if kind == "conv" else torch.randn(4, 6, dtype=D)
    y0 = base(x).detach()
    layer = _wrap(base, 3, basis)
    assert torch.all(layer.s > 0)
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=1e-12)        # ΔW = 0 at start
    for name, kind_ in layer.basis_kinds.items():                        # bases on their manifold
        X = getattr(layer, name)
        torch.testing.assert_close(manifolds.retraction(kind_, X), X)
    # train a little, then merge
    with torch.no_grad():
        for b in layer.basis_names:
            getattr(layer, b).add_(0.3 * torch.randn_like(getattr(layer, b)))
        layer.s.mul_(2.0)
    y = layer(x).detach()
    merged = layer.merged_base()
    torch.testing.assert_close(merged(x), y, rtol=1e-12, atol=1e-12)


def test_truncation_error_bounded_by_removed_terms():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(D)
    debora.inject(model, debora.DeboraConfig(target_modules=["0"], init_rank=6, eps=1e-3, tau=2.0))
    layer = model[0]
    _randomise(layer, gen)
    with torch.no_grad():
        layer.s[[1, 4]] = 1e-3 + 1e-9
    x = torch.randn(10, 8, generator=gen, dtype=D)
    h_before = layer(x).detach()
    old_V, old_U = layer.V.detach()[:, [1, 4]], layer.U.detach()[:, [1, 4]]
    removed_term = layer.scaling * ((x @ layer.V[:, [1, 4]]) * layer.s[[1, 4]]) @ layer.U[:, [1, 4]].T
    n_before = sum(p.numel() for p in model.parameters())
    old_s = layer.s
    report = debora.truncate(model)
    kept, removed = report["0"]
    assert removed.tolist() == [1, 4] and kept.tolist() == [0, 2, 3, 5]
    assert layer.s is not old_s and layer.rank == 4 and layer.U.shape == (8, 4)
    assert layer.V.stride() == (1, 8) and layer.U.is_contiguous()        # input basis column-major
    assert n_before - sum(p.numel() for p in model.parameters()) == 2 * (1 + 8 + 8)
    h_after = layer(x).detach()
    # exactly the removed rank-one terms disappear
    torch.testing.assert_close(h_before - h_after, removed_term, rtol=1e-10, atol=1e-12)
    # and the change obeys ‖Δh_n‖ ≤ scaling · Σ_removed s_i |x_n·v_i| ‖u_i‖ ≤ scaling · 2(ε+atol) max ‖x_n‖‖v_i‖‖u_i‖
    terms = layer.scaling * (1e-3 + 1e-9) * sum(
        (x @ V_i).abs() * U_i.norm() for V_i, U_i in zip(old_V.T, old_U.T))
    assert torch.all((h_before - h_after).norm(dim=1) <= terms * (1 + 1e-12))
    assert debora.truncate(model) == {}            # nothing left at the floor


def test_truncation_to_rank_zero_and_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    debora.inject(model, debora.DeboraConfig(target_modules=["0", "1"], init_rank=2, eps=1e-2))
    opt = torch.optim.Adam(debora.lower_parameters(model).values(), lr=1e-2)
    x = torch.randn(3, 5)
    model(x).sum().backward()
    opt.step()
    old_U1 = model[1].U
    exp_avg = opt.state[old_U1]["exp_avg"].clone()
    with torch.no_grad():
        model[0].s.fill_(1e-2)
        model[1].s[0] = 1e-2
    report = debora.truncate(model, optimizer=opt)
    assert set(report) == {"0", "1"} and model[0].rank == 0 and model[1].rank == 1
    torch.testing.assert_close(model[0](x), model[0].base(x))            # rank 0 = base layer
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is model[1].U for p in params) and not any(p is old_U1 for p in params)
    assert old_U1 not in opt.state
    torch.testing.assert_close(opt.state[model[1].U]["exp_avg"], exp_avg[:, 1:])
    assert opt.state[model[0].U]["exp_avg"].shape == (5, 0)
    model(x).sum().backward()
    opt.step()                                                           # optimizer still works
    kept = debora.truncate(model, min_rank=1, atol=10.0)
    assert model[1].rank == 1 and "1" not in kept


@pytest.mark.parametrize("kind", ["oblique", "stiefel"])
def test_manifold_projection_and_retraction(kind):
    gen = torch.Generator().manual_seed(0)
    X = manifolds.random_point(kind, 7, 3, gen, D)
    G = torch.randn(7, 3, generator=gen, dtype=D)
    P = manifolds.project(kind, X, G)
    torch.testing.assert_close(manifolds.project(kind, X, P), P)       # idempotent
    if kind == "oblique":
        torch.testing.assert_close((X * P).sum(0), torch.zeros(3, dtype=D), atol=1e-12, rtol=0)
    else:
        XtP = X.T @ P
        torch.testing.assert_close(XtP + XtP.T, torch.zeros(3, 3, dtype=D), atol=1e-12, rtol=0)
    Y = manifolds.retraction(kind, X + 0.1 * P)
    if kind == "oblique":
        torch.testing.assert_close(Y.norm(dim=0), torch.ones(3, dtype=D))
    else:
        torch.testing.assert_close(Y.T @ Y, torch.eye(3, dtype=D))


def test_manifold_step_keeps_bases_on_manifold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Conv2d(6, 4, 3))
    cfg = debora.DeboraConfig(target_modules=["0", "1"], init_rank=3, basis="stiefel")
    debora.inject(model, cfg)
    opt = torch.optim.SGD(debora.lower_parameters(model).values(), lr=0.5)
    ids = {k: id(v) for k, v in debora.lower_parameters(model).items()}
    model[0].U.sum().mul(1.0).backward()
    (model[1].A.sum() + model[1].C.sum()).backward()
    debora.manifold_step(model, opt)
    for k, p in debora.lower_parameters(model).items():
        assert id(p) == ids[k]
    U, C = model[0].U.detach(), model[1].C.detach()
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(C.norm(dim=0), torch.ones(3), atol=1e-5, rtol=0)
    assert debora.manifolds.basis_kinds(model)["1.C"] == "oblique"


class _StaticSame(nn.Conv2d):
    """EfficientNet-style TF 'SAME' conv: asymmetric zero padding module, then an unpadded conv."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.static_padding = nn.ZeroPad2d((0, 1, 1, 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class _DynamicSame(nn.Conv2d):
    def forward(self, x):
        x = F.pad(x, [1, 0, 0, 1])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("cls, mode, pad", [(_StaticSame, "static_padding", (0, 1, 1, 2)),
                                            (_DynamicSame, "merged_kernel", (1, 0, 0, 1))])
def test_conv2d_subclasses_with_own_padding(cls, mode, pad):
    torch.manual_seed(0)
    base = cls(3, 4, 3, stride=2).to(D)
    W0 = base.weight.detach().clone()
    layer = _wrap(base, 3)
    assert layer.mode == mode
    _randomise(layer, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 9, 8, dtype=D)
    K = layer.delta_weight()
    expected = F.conv2d(F.pad(x, list(pad)), W0 + K, base.bias, base.stride)
    torch.testing.assert_close(layer(x), expected, rtol=1e-11, atol=1e-11)
    out = layer(x).sum()
    out.backward()
    assert all(getattr(layer, b).grad is not None for b in layer.basis_names)


def test_refold_restores_a_checkpointed_oblique_layer():
    torch.manual_seed(0)
    make = lambda seed: _wrap(nn.Linear(6, 5).to(D).requires_grad_(False), 3, "oblique", seed=seed)
    torch.manual_seed(0)
    a = make(1)
    torch.manual_seed(0)
    b = make(2)                      # same base weights, another random ΔW0 folded in
    x = torch.randn(4, 6, dtype=D)
    with torch.no_grad():
        a.U.add_(0.1)
        for n in ("s", "U", "V"):
            getattr(b, n).copy_(getattr(a, n))
    assert (a(x) - b(x)).abs().max() > 1e-3
    b.refold_(a.init_factors())
    torch.testing.assert_close(b(x), a(x), rtol=1e-12, atol=1e-12)
