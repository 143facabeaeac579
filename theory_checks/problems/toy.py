"""Toy problems: layer regression with a known low-rank target, small enough for dense Hessians.

* ``matrix`` (d = 2): a linear layer ``y = (W0 + Ψ) x`` with Ψ = U diag(s) Vᵀ, data x ~ N(0, I),
  targets from ``W0 + Ψ*`` with Ψ* of rank 2 plus Gaussian noise.
* ``cp`` (d = 4): a 3×3 convolution ``y = conv(x, W0 + Ψ)`` with a CP adapter
  Ψ = Σ s_i a_i ⊗ b_i ⊗ c_i ⊗ d_i and a CP-rank-2 target.

Loss ``L = ½ mean_examples ‖prediction − target‖²`` is quadratic in Ψ, so
``K = ‖∇²L(Ψ)‖`` is known in closed form: ``λ_max(XᵀX/N)`` (matrix) and ``λ_max`` of the im2col
Gram matrix (conv) — :func:`analytic_K` — which the tests compare with the estimator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AdapterProblem, LayerSpec, distinct_s0, split_halves

DEFAULTS = dict(
    matrix=dict(shape=(8, 8), rank=4, n=512),
    cp=dict(shape=(6, 4, 3, 3), rank=3, n=384, hw=5),
)


def _unit(n, gen):
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return v / v.norm()


def make_toy(kind: str = "matrix", basis: str = "euclidean", seed: int = 0, n: int | None = None,
             rank: int | None = None, noise: float = 0.1, tau: float = 1.5, eps: float = 1e-3,
             weight_decay: float = 1e-2, target_weights=(1.0, 0.5)) -> AdapterProblem:
    cfg = dict(DEFAULTS[kind])
    n = n or cfg["n"]
    rank = rank or cfg["rank"]
    shape = cfg["shape"]
    gen = torch.Generator().manual_seed(1000 + seed)
    W0 = 0.3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    target = torch.zeros(shape, dtype=torch.float64)
    for w in target_weights:
        comp = _unit(shape[0], gen)
        for dim in shape[1:]:
            comp = torch.tensordot(comp, _unit(dim, gen), dims=0)
        target = target + w * comp
    W_true = W0 + target
    if kind == "matrix":
        X = torch.randn(n, shape[1], generator=gen, dtype=torch.float64)
        Y = X @ W_true.T + noise * torch.randn(n, shape[0], generator=gen, dtype=torch.float64)

        def forward(weights, head, batch):
            return batch["x"] @ weights["layer"].T
    else:
        hw = cfg["hw"]
        X = torch.randn(n, shape[1], hw, hw, generator=gen, dtype=torch.float64)
        Y = F.conv2d(X, W_true, padding=1)
        Y = Y + noise * torch.randn(Y.shape, generator=gen, dtype=torch.float64)

        def forward(weights, head, batch):
            return F.conv2d(batch["x"], weights["layer"], padding=1)

    def loss(out, batch):
        return 0.5 * ((out - batch["y"]) ** 2).reshape(out.shape[0], -1).sum(1).mean()

    perm = torch.randperm(n, generator=gen)
    half = n // 2
    D1, D2 = split_halves({"x": X, "y": Y}, perm)
    layer = LayerSpec("layer", tuple(shape), rank, 1.0)
    s0 = distinct_s0(rank, tau, eps)
    d = len(shape)
    return AdapterProblem(
        f"toy-{kind}-{basis}", [layer], {"layer": W0}, {}, forward, loss, D1, D2, basis=basis,
        tau=tau, eps=eps, weight_decay=weight_decay, s0=s0, init_scale=1.0, seed=seed,
        description=(f"{'linear' if kind == 'matrix' else '3x3 conv'} layer regression, W0 + Ψ "
                     f"with Ψ of shape {shape} (d={d}), adapter rank r={rank}, target rank "
                     f"{len(target_weights)} (weights {target_weights}), noise σ={noise}, "
                     f"|D1|=|D2|={half}, τ={tau}, ε={eps}, damping λ={weight_decay}"),
        restricted="none (the whole problem is small: dense Hessians and exact hypergradients)")


def analytic_K(ap: AdapterProblem) -> float:
    """``‖∇²_Ψ L‖`` in closed form for the quadratic toy losses (on D2)."""
    X = ap.D2["x"]
    N = X.shape[0]
    if X.dim() == 2:
        return float(torch.linalg.eigvalsh(X.T @ X / N)[-1])
    W = ap.frozen["layer"]
    cols = F.unfold(X, kernel_size=W.shape[-2:], padding=1)        # (N, in·kh·kw, L)
    G = torch.einsum("npl,nql->pq", cols, cols) / N
    return float(torch.linalg.eigvalsh(G)[-1])


def debora_crosscheck(ap: AdapterProblem, s: torch.Tensor, y) -> dict:
    """Evaluate the library's ``debora-closed-form`` (Euclidean and Riemannian basis gradients) on a
    model built with ``debora.inject`` whose base weight, s and bases are set to this problem's
    point, and compare with this package's own closed form. Returns max abs differences."""
    import debora
    import bilevel
    from torch import nn

    layer = ap.layers[0]
    W0 = ap.frozen["layer"]
    if layer.order == 2:
        base = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
    else:
        base = nn.Conv2d(W0.shape[1], W0.shape[0], W0.shape[2:], padding=1, bias=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = base

        def forward(self, inp):
            return self.layer(inp)

    model = Net().to(W0.dtype)
    cfg = debora.DeboraConfig(target_modules=["layer"], init_rank=layer.rank, alpha=float(layer.rank),
                              tau=ap.tau, eps=ap.eps, basis=ap.basis, init_seed=0)
    debora.inject(model, cfg)
    ad = model.layer
    facs = ap.factors(y)["layer"]
    names = ("U", "V") if layer.order == 2 else ("A", "B", "C", "D")
    with torch.no_grad():
        ad.base.weight.copy_(W0)
        ad.s.copy_(s)
        for n_, f in zip(names, facs):
            getattr(ad, n_).copy_(f)

    def loss(out, batch):
        return 0.5 * ((out - batch[1]) ** 2).reshape(out.shape[0], -1).sum(1).mean()

    problem, x, yy = debora.bilevel_problem(model, loss)
    D1 = (ap.D1["x"], ap.D1["y"])
    out = {"f1_diff": abs(float(problem.f(x, yy, D1)) - float(ap.upper_loss({"s": s}, y, ap.D1)))}
    for bg, riem in (("euclidean", False), ("riemannian", True)):
        lib = bilevel.estimators.get("debora-closed-form", basis_grad=bg)(problem, x, yy, D1, D1).grad
        lib = next(iter(lib.values())).detach()
        own = ap.closed_form({"s": s}, y, ap.D1, riemannian=riem)["s"]
        out[bg] = float((lib - own).abs().max())
        out[bg + "_scale"] = float(own.abs().max())
    return out
