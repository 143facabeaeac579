"""The first-order (Taylor) cost of removing each SVD component of an adapter: ``svd_allocation="taylor"``.

An SVD cut removes component j of layer ℓ, W_ℓ → W_ℓ − scaling · σ_j u_j v_jᵀ (its singular triplet
of ΔW, or of ΔW − ΔW0 when the cut unfolds the initial update: refactor.py). To first order the upper
loss f1 changes by

    Δf1_j ≈ −scaling · σ_j · u_jᵀ Ḡ_ℓ v_j,        Ḡ_ℓ = ∂f1/∂W_ℓ  (D1 batches, dropout off),

the envelope-theorem signal that ``theory_checks --checks cut`` found to rank the components by their
exact removal cost (MiniLM: Spearman ρ 0.985, against 0.01 for σ² per parameter). The key of a
component is Δf1_j / p_ℓ (p_ℓ: the parameters it costs), smallest first: the components whose removal
lowers f1, or raises it least per parameter, go first.

Ḡ_ℓ is the gradient of the loss with respect to the adapted layer's base weight (the adapter adds to
it, so that is ∂f1/∂W_ℓ), averaged over ``taylor_batches`` D1 batches. It costs one forward and
backward per batch with weight gradients for the adapted layers, so the trainer refreshes it every
``taylor_refresh`` of the run, not at every cut, and projects the current components on it. BatchNorm
layers use their batches' statistics during that pass (the function the recalibrated model evaluates).

Measured (README, "Rank selection", round 14): not better than the default's σ² per parameter. On text
level at target 1 and below at targets 2 and 4 (seeds 0-2/0-5, paired), on Fashion-MNIST 7-8 points
below (it empties the early layers under a global budget). Kept as an option.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from debora.refactor import _svd, has_svd


def weight_gradients(layers: Mapping[str, nn.Module], batches: Iterable[dict],
                     loss_of: Callable[[dict], torch.Tensor],
                     reduce: Optional[Callable[[list], None]] = None) -> Dict[str, torch.Tensor]:
    """Ḡ_ℓ = mean over ``batches`` of ∂ loss_of(batch) / ∂ W_ℓ for every layer with an SVD (float32,
    the shape of its base weight); ``reduce`` (several processes) averages the list of tensors in place.
    The base weights' ``requires_grad`` is restored afterwards; no other gradient is touched."""
    chosen = {n: layer for n, layer in layers.items() if has_svd(layer)}
    weights = [layer.weight_ref for layer in chosen.values()]
    flags = [w.requires_grad for w in weights]
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    count = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_of(batch), weights, allow_unused=True)
            for acc, g in zip(sums, grads):
                if g is not None:
                    acc += g.float()
            count += 1
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    sums = [s / max(count, 1) for s in sums]
    if reduce is not None and sums:
        reduce(sums)
    return dict(zip(chosen, sums))


@torch.no_grad()
def removal_costs(layer: nn.Module, grad: torch.Tensor, unfold: bool = False) -> torch.Tensor:
    """Δf1_j ≈ −scaling · σ_j · u_jᵀ Ḡ v_j for the leading ``layer.rank`` SVD components of the layer's
    update (of ΔW − ΔW0 with ``unfold``, as :func:`debora.refactor.singular_values` orders them)."""
    P, sig, Q = _svd(layer, unfold)
    G = grad.reshape(grad.shape[0], -1).to(P)           # out × in (a 1×1 conv kernel: out × in × 1 × 1)
    if getattr(layer, "transposed", False):             # GPT-2's Conv1D stores W as in × out
        G = G.transpose(0, 1)
    projected = ((P.transpose(0, 1) @ G) * Q.transpose(0, 1)).sum(1)    # u_jᵀ Ḡ v_j
    return -layer.scaling * sig * projected
