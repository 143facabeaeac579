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
from torch import nn

from .base import AdapterProblem, distinct_s0, split_data

DEFAULTS = dict(
    matrix=dict(shape=(8, 8), rank=4, n=512),
    cp=dict(shape=(6, 4, 3, 3), rank=3, n=384, hw=5),
)


def _unit(n, gen):
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return v / v.norm()


class _Net(nn.Module):
    """One bias-free layer named ``layer`` (``nn.Linear`` or a 3×3 ``nn.Conv2d`` with padding 1)."""

    def __init__(self, W0: torch.Tensor):
        super().__init__()
        if W0.dim() == 2:
            self.layer = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        else:
            self.layer = nn.Conv2d(W0.shape[1], W0.shape[0], tuple(W0.shape[2:]), padding=1, bias=False)
        self.to(W0.dtype)
        with torch.no_grad():
            self.layer.weight.copy_(W0)

    def forward(self, x):
        return self.layer(x)


def _inputs(batch):
    return (batch["x"],), {}


def _loss(out, batch):
    return 0.5 * ((out - batch["y"]) ** 2).reshape(out.shape[0], -1).sum(1).mean()


def make_toy(kind: str = "matrix", basis: str = "euclidean", seed: int = 0, n: int | None = None,
             rank: int | None = None, noise: float = 0.1, tau: float = 1.5, eps: float = 1e-3,
             weight_decay: float = 1e-2, target_weights=(1.0, 0.5), shape: tuple | None = None,
             split: str = "halves", s0=None, scaling: float = 1.0, init_scale: float = 1.0,
             upper_damped: bool = False, name: str | None = None) -> AdapterProblem:
    """The toy of the module doc. ``s0``: a tensor, a float (every s_i), or None (distinct weights);
    ``split``: ``"halves"`` (|D1| = |D2| = n/2) or ``"same"`` (D1 = D2 = all n examples)."""
    cfg = dict(DEFAULTS[kind])
    n = n or cfg["n"]
    rank = rank or cfg["rank"]
    shape = tuple(shape or cfg["shape"])
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
    else:
        hw = cfg["hw"]
        X = torch.randn(n, shape[1], hw, hw, generator=gen, dtype=torch.float64)
        Y = F.conv2d(X, W_true, padding=1)
        Y = Y + noise * torch.randn(Y.shape, generator=gen, dtype=torch.float64)

    perm = torch.randperm(n, generator=gen)
    D1, D2 = split_data({"x": X, "y": Y}, perm, split)
    if s0 is None:
        s0 = distinct_s0(rank, tau, eps)
    elif isinstance(s0, (int, float)):
        s0 = torch.full((rank,), float(s0), dtype=torch.float64)
    d = len(shape)
    sizes = f"|D1|=|D2|={n // 2}" if split == "halves" else f"D1 = D2 (all {n} examples)"
    return AdapterProblem(
        name or f"toy-{kind}-{basis}", _Net(W0), {"layer": rank}, _inputs, _loss, D1, D2, basis=basis,
        tau=tau, eps=eps, weight_decay=weight_decay, s0=s0, init_scale=init_scale, seed=seed,
        scaling=scaling, upper_damped=upper_damped, split=split,
        description=(f"{'linear' if kind == 'matrix' else '3x3 conv'} layer regression, W0 + Ψ "
                     f"with Ψ of shape {shape} (d={d}), adapter rank r={rank}, target rank "
                     f"{len(target_weights)} (weights {target_weights}), noise σ={noise}, "
                     f"{sizes}, τ={tau}, ε={eps}, damping λ={weight_decay}"
                     + (f", scaling α/r0={scaling:g}" if scaling != 1.0 else "")),
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
