"""SVD re-factorisation of matrix adapters: the same update ΔW, written in its singular directions.

    sig = debora.singular_values(layer)                    # σ(ΔW)/scaling, descending, length r
    debora.svd_refactor(model, names=[...], optimizer=opt) # in place; the model's outputs are unchanged

A matrix adapter's update is ΔW = scaling · U diag(s) Vᵀ (rank r). With thin QR factorisations
U = Q_U R_U and V = Q_V R_V, the r×r core R_U diag(s) R_Vᵀ = P diag(σ) Qᵀ gives

    ΔW = scaling · (Q_U P) diag(σ) (Q_V Q)ᵀ,

so the new bases U' = Q_U P, V' = Q_V Q have orthonormal columns (they lie on the oblique and the
Stiefel manifolds) and s' = σ, sorted in descending order. Cutting the last components of the
re-factorised layer is then the best approximation of ΔW of that rank (Eckart–Young), and
components that duplicate each other (the theory checks saw them collapse onto one direction) are
merged instead of dropped one by one.

Feasibility for Frank-Wolfe: with unit-norm columns ‖u_i v_iᵀ‖_* = 1, so Σ_j σ_j = ‖U diag(s) Vᵀ‖_* ≤
Σ_i s_i: a point of {s ≥ ε, Σ s ≤ τ + rε} stays in the set (up to the floor: a σ_j below ε is raised
to ε, which changes ΔW by at most scaling·ε in that direction). With Euclidean bases s is only
defined up to a rescaling of the bases; there s' = c·σ with c ≤ 1 chosen so that Σ s' ≤ Σ s, and the
output bases carry 1/c, so ΔW is exactly unchanged.

The Parameters are updated in place (same objects, same shapes), so optimizers, DDP wrappers and
parameter names are untouched; pass ``optimizer=`` to reset the optimizer's state of the re-factorised
bases (their coordinates changed, so moments in the old coordinates mean nothing; Adam restarts its
bias correction for them).

CP adapters of 1×1 convolutions (the pointwise convs that carry most of a MobileNet/EfficientNet's
weights) are matrix adapters in disguise: with kh = kw = 1, ΔK[:, :, 0, 0] = scaling · A diag(s ∘ c ∘ d) Bᵀ
where c_i = C[0, i] and d_i = D[0, i] are scalars (±1 on the oblique manifold). They are re-factorised
the same way with U = A, V = B and weights s ∘ c ∘ d; afterwards C = D = 1. CP adapters with a larger
kernel have no SVD (a CP decomposition has no Eckart–Young theorem) and are left alone.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .layers import adapter_layers
from .layers.conv import CPConv2dAdapter
from .layers.linear import MatrixAdapter


def has_svd(layer: nn.Module) -> bool:
    """True for matrix adapters and 1×1 CP conv adapters (whose update is a matrix), at rank ≥ 1."""
    if isinstance(layer, CPConv2dAdapter):
        return layer.kh == 1 and layer.kw == 1 and layer.rank > 0
    return isinstance(layer, MatrixAdapter) and layer.rank > 0


def _factors(layer: nn.Module, unfold: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, w) in float64 with the update = scaling · U diag(w) Vᵀ; ``unfold`` (a folded layer):
    the update's change since the start, ΔW − ΔW0, as [U, U0] diag([w, w0]) [V, V0]ᵀ with
    w0 = −1/scaling (CP: −c0∘d0/scaling), since ΔW0 = U0 V0ᵀ with the scaling inside U0."""
    if isinstance(layer, CPConv2dAdapter):
        U, V = layer.A.double(), layer.B.double()
        w = layer.s.double() * layer.C.double()[0] * layer.D.double()[0]
    else:
        U, V, w = layer.U.double(), layer.V.double(), layer.s.double()
    if unfold and layer.folded:
        f = {k: v.double() for k, v in layer.init_factors().items()}
        if isinstance(layer, CPConv2dAdapter):
            U0, V0, w0 = f["A"], f["B"], -(f["C"][0] * f["D"][0])
        else:
            U0, V0 = f["U"], f["V"]
            w0 = -torch.ones(U0.shape[1], dtype=torch.float64, device=U0.device)
        U, V = torch.cat([U, U0], 1), torch.cat([V, V0], 1)
        w = torch.cat([w, w0 / layer.scaling])
    return U, V, w


@torch.no_grad()
def layer_svd(layer: nn.Module, unfold: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, σ, Q) in float64 with U diag(w) Vᵀ = P diag(σ) Qᵀ (without ``scaling``), the leading
    ``layer.rank`` singular triplets (all of them unless ``unfold``: ΔW − ΔW0 has rank ≤ 2r)."""
    U, V, s = _factors(layer, unfold)
    qu, ru = torch.linalg.qr(U)
    qv, rv = torch.linalg.qr(V)
    p, sig, qt = torch.linalg.svd((ru * s) @ rv.transpose(0, 1))
    r = layer.rank
    return (qu @ p)[:, :r], sig[:r], (qv @ qt.transpose(0, 1))[:, :r]


@torch.no_grad()
def singular_values(layer: nn.Module, unfold: bool = False) -> torch.Tensor:
    """σ(U diag(s) Vᵀ) of a matrix adapter or a 1×1 CP adapter (descending, in s's units: ΔW's
    singular values / scaling); ``unfold``: the leading r of σ(ΔW − ΔW0) for a folded layer. For
    another CP adapter, or at rank 0, its ``s`` as it is."""
    if not has_svd(layer):
        return layer.s.detach().clone()
    return layer_svd(layer, unfold)[1].to(layer.s.dtype)


@torch.no_grad()
def svd_refactor(model: nn.Module, names: Optional[Iterable[str]] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 unfold: bool = False) -> Dict[str, torch.Tensor]:
    """Re-factorise the matrix and 1×1 CP adapters ``names`` (default: all) in place; returns
    ``{name: new s}`` for the layers it re-factorised (others are left alone).

    ``unfold=True`` (oblique/Stiefel layers, whose initial ΔW0 is folded into the base weight): the
    layer is rewritten to the best rank-r approximation of what training changed, E = ΔW − ΔW0, and
    the fold is undone (``W0 ← W0 + ΔW0``, :meth:`AdapterLayer.unfold_`). The outputs are unchanged
    when rank(E) ≤ r and otherwise move by E's (r+1)-th singular value at most; a later cut of the
    tail is then Eckart–Young-optimal for E, so a removed component no longer re-adds its part of
    the random ΔW0 to the weights. Σσ(E) is not bounded by Σs (Frank-Wolfe's budget), unlike the
    folded refactorisation."""
    layers = adapter_layers(model)
    wanted = list(layers) if names is None else list(names)
    unknown = [n for n in wanted if n not in layers]
    if unknown:
        raise ValueError(f"not adapter layers: {unknown}; known: {list(layers)[:5]}...")
    eps = _eps(model)
    out: Dict[str, torch.Tensor] = {}
    for name in wanted:
        layer = layers[name]
        if not has_svd(layer):
            continue
        unfolding = unfold and layer.folded
        P, sig, Q = layer_svd(layer, unfolding)
        if layer.basis == "euclidean":
            c = min(1.0, float(layer.s.double().sum()) / max(float(sig.sum()), 1e-300))
            s_new = (c * sig).clamp_min(eps)
            P = P * (sig / s_new)                 # U' diag(s') = P diag(σ): ΔW exactly unchanged
        else:
            s_new = sig.clamp_min(eps)
        layer.s.copy_(s_new.to(layer.s.dtype))
        if isinstance(layer, CPConv2dAdapter):
            rotated = (layer.A, layer.B, layer.C, layer.D)
            layer.C.fill_(1.0)                    # the signs c_i d_i now live in P's columns
            layer.D.fill_(1.0)
        else:
            rotated = (layer.U, layer.V)
        rotated[0].copy_(P.to(rotated[0].dtype))
        rotated[1].copy_(Q.to(rotated[1].dtype))
        if optimizer is not None:     # s too, where the optimizer trains it (the trainer's learn_s)
            for p in (*rotated, layer.s):
                _reset_state(optimizer, p)
        if unfolding:
            layer.unfold_()
        out[name] = layer.s.detach().clone()
    return out


def _eps(model) -> float:
    from .inject import get_config
    return float(get_config(model).eps)


def _reset_state(opt: torch.optim.Optimizer, p: nn.Parameter) -> None:
    state = opt.state.get(p)
    if not state:
        return
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v.zero_()          # moments and the step counter (Adam's bias correction restarts)


@torch.no_grad()
def refold_magnitudes_(layer: nn.Module, keep: torch.Tensor, s0: float, init_rank: int) -> None:
    """Give the components ``keep`` (bool mask over the layer's r components) the magnitude s0 again,
    without changing the model: for an unfolded oblique/Stiefel matrix or 1×1 CP adapter (after
    ``svd_refactor(..., unfold=True)``, its kept s = σ),

        ΔW0' = scaling · U[:, keep] diag(s0 − s[keep]) V[:, keep]ᵀ        is folded into the weight,
        s[keep] ← s0,

    so W − ΔW0' + scaling · U diag(s) Vᵀ is unchanged. Components left out of ``keep`` are untouched
    (the caller removes them). Why: with s held (``fw_step_size = 0``), s sets each component's step
    size on the sphere; a cut leaves s = σ(ΔW − ΔW0), far from the LoRA-sized s0 the run trained with.
    The buffers ``<b>0`` keep ``init_rank`` columns (zero-padded), the shape :mod:`debora.io` saves."""
    if layer.basis == "euclidean" or layer.folded or not has_svd(layer):
        raise ValueError(f"refold_magnitudes_ needs an unfolded oblique/Stiefel matrix or 1×1 CP adapter "
                         f"(after svd_refactor(..., unfold=True)); got basis={layer.basis!r}, "
                         f"folded={layer.folded}, {type(layer).__name__} of rank {layer.rank}")
    keep = keep.to(device=layer.s.device, dtype=torch.bool)
    if keep.shape != layer.s.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, the layer has {layer.rank} components")
    if not 0 < init_rank or layer.rank > init_rank:
        raise ValueError(f"init_rank={init_rank} must be >= the layer's rank {layer.rank}")
    delta = torch.where(keep, s0 - layer.s, torch.zeros_like(layer.s)) * layer.scaling
    pad = init_rank - layer.rank
    factors = {}
    for n in layer.basis_names:
        P = getattr(layer, n).detach().clone()
        if n == layer.basis_names[0]:
            P = P * delta
        elif isinstance(layer, CPConv2dAdapter) and n in ("C", "D"):
            P = torch.ones_like(P)                # 1×1: c_i = d_i = 1 after the refactorisation
        factors[n] = torch.cat([P, P.new_zeros(P.shape[0], pad)], 1)
    layer.fold_init_(factors)                     # W ← W − ΔW0'
    layer.refolded = True
    layer.s.copy_(torch.where(keep, torch.full_like(layer.s, s0), layer.s))
