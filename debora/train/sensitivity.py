"""The Taylor cost of removing each SVD component of an adapter: first order (``svd_allocation="taylor"``)
and second order through a Kronecker-factored Fisher (``svd_allocation="fisher"``).

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

Measured (docs/rank_selection.md, round 14): not better than the default's σ² per parameter. On text
level at target 1 and below at targets 2 and 4 (seeds 0-2/0-5, paired), on Fashion-MNIST 7-8 points
below (it empties the early layers under a global budget). Kept as an option.

Second order (``"fisher"``, Optimal Brain Damage): at a minimum of f1 the first-order term vanishes and

    Δf1_j ≈ ½ (scaling · σ_j)² ⟨u_j v_jᵀ, F_ℓ [u_j v_jᵀ]⟩ ≈ ½ (scaling · σ_j)² (u_jᵀ S_ℓ u_j)(v_jᵀ A_ℓ v_j),

F_ℓ the empirical Fisher E_i[vec(g_i) vec(g_i)ᵀ] of the per-example gradients g_i = ∂ℓ_i/∂W_ℓ = Σ_t δ_it x_itᵀ
(t: the positions a weight is applied at: tokens, or pixels of a 1×1 conv), in its Kronecker-factored form
(K-FAC, Martens & Grosse 2015, one factor per side, cross-position terms dropped):

    A_ℓ = mean over positions of x xᵀ (in × in),     S_ℓ = mean over examples of Σ_t δ δᵀ (out × out),

δ the gradient of the example's own loss with respect to the layer's output. The key is that cost per
parameter; it is never negative, so it says what a component contributes, not where the loss wants to go
(the first-order key's failure). A_ℓ and S_ℓ are cached like Ḡ_ℓ and projected on the current components.

Measured (docs/rank_selection.md, round 15): level with σ² per parameter or below it on the means (text:
−0.8 to +0.1 point over targets 1/2/4, Fashion-MNIST −0.45 / +0.29 over six seeds; nothing separated from
the seed noise); it moves the ranks to the value adapters on text and to the first convolutions on images.
Kept as an option.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from debora.refactor import layer_svd, has_svd


@contextlib.contextmanager
def _base_weights_with_grad(layers: Mapping[str, nn.Module]):
    """The layers with an SVD (name → layer) and their base weights, which require grad inside (so that
    the loss depends on them, and every base output carries a gradient); their flags restored after."""
    chosen = {n: layer for n, layer in layers.items() if has_svd(layer)}
    weights = [layer.weight_ref for layer in chosen.values()]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield chosen, weights
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)


def weight_gradients(layers: Mapping[str, nn.Module], batches: Iterable[dict],
                     loss_of: Callable[[dict], torch.Tensor],
                     reduce: Optional[Callable[[list], None]] = None) -> Dict[str, torch.Tensor]:
    """Ḡ_ℓ = mean over ``batches`` of ∂ loss_of(batch) / ∂ W_ℓ for every layer with an SVD (float32,
    the shape of its base weight); ``reduce`` (several processes) averages the list of tensors in place.
    The base weights' ``requires_grad`` is restored afterwards; no other gradient is touched."""
    with _base_weights_with_grad(layers) as (chosen, weights):
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        count = 0
        for batch in batches:
            grads = torch.autograd.grad(loss_of(batch), weights, allow_unused=True)
            for acc, g in zip(sums, grads):
                if g is not None:
                    acc += g.float()
            count += 1
    sums = [s / max(count, 1) for s in sums]
    if reduce is not None and sums:
        reduce(sums)
    return dict(zip(chosen, sums))


@torch.no_grad()
def removal_costs(layer: nn.Module, grad: torch.Tensor, unfold: bool = False) -> torch.Tensor:
    """Δf1_j ≈ −scaling · σ_j · u_jᵀ Ḡ v_j for the leading ``layer.rank`` SVD components of the layer's
    update (of ΔW − ΔW0 with ``unfold``, as :func:`debora.refactor.singular_values` orders them)."""
    P, sig, Q = layer_svd(layer, unfold)
    G = grad.reshape(grad.shape[0], -1).to(P)           # out × in (a 1×1 conv kernel: out × in × 1 × 1)
    if getattr(layer, "transposed", False):             # GPT-2's Conv1D stores W as in × out
        G = G.transpose(0, 1)
    projected = ((P.transpose(0, 1) @ G) * Q.transpose(0, 1)).sum(1)    # u_jᵀ Ḡ v_j
    return -layer.scaling * sig * projected


def _positions(base: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(X, Δ): the layer's inputs and output gradients one row per position (tokens, or the pixels a 1×1
    convolution is applied at: its input padded and strided like the convolution)."""
    if x.dim() == 4:    # 1×1 Conv2d: N × C × H × W
        ph, pw = base.padding if isinstance(base.padding, tuple) else (0, 0)
        sh, sw = base.stride
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        x = x[:, :, ::sh, ::sw]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])


def kronecker_factors(layers: Mapping[str, nn.Module], batches: Iterable[dict],
                      loss_of: Callable[[dict], torch.Tensor],
                      reduce: Optional[Callable[[list], None]] = None
                      ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """(A_ℓ, S_ℓ) of every layer with an SVD on the loss's path (float32; float64 for float64 inputs), each
    the mean over ``batches`` of its per-batch value (every batch weighs the same, so processes averaging
    their own batches agree with one process running them all): A_ℓ the mean over positions of the base
    layer's input x xᵀ, S_ℓ the mean over examples of Σ_positions δ δᵀ, δ the gradient of the example's own
    loss with respect to the base layer's output (``loss_of`` is the batch mean of per-example losses: the
    batch's gradient times its leading size). ``reduce`` (several processes) averages the list in place. The
    base weights' ``requires_grad`` is restored afterwards; no parameter's ``.grad`` is touched."""
    A: Dict[str, torch.Tensor] = {}
    S: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    with _base_weights_with_grad(layers) as (chosen, _):
        seen: Dict[str, list] = {n: [] for n in chosen}

        def hook(name):
            def capture(module, args, output):
                seen[name].append((args[0].detach(), output))
            return capture
        handles = [layer.base.register_forward_hook(hook(n)) for n, layer in chosen.items()]
        try:
            for batch in batches:
                for lst in seen.values():
                    lst.clear()
                loss = loss_of(batch)
                calls = [(n, x, out) for n, lst in seen.items() for x, out in lst]
                grads = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
                size = calls[0][1].shape[0] if calls else 0      # the batch's examples (leading dimension)
                for (n, x, out), g in zip(calls, grads):
                    if g is None:
                        g = torch.zeros_like(out)
                    dtype = torch.promote_types(x.dtype, torch.float32)
                    X, D = _positions(chosen[n].base, x.to(dtype), g.to(dtype) * size)
                    a, s_ = X.transpose(0, 1) @ X / X.shape[0], D.transpose(0, 1) @ D / size
                    A[n] = A[n] + a if n in A else a
                    S[n] = S[n] + s_ if n in S else s_
                    counts[n] = counts.get(n, 0) + 1
        finally:
            for h in handles:
                h.remove()
            seen.clear()
    names = [n for n in chosen if n in A]
    flat = [A[n] / counts[n] for n in names] + [S[n] / counts[n] for n in names]
    if reduce is not None and flat:
        reduce(flat)
    return {n: (flat[i], flat[len(names) + i]) for i, n in enumerate(names)}


@torch.no_grad()
def curvature_costs(layer: nn.Module, factors: Tuple[torch.Tensor, torch.Tensor],
                    unfold: bool = False) -> torch.Tensor:
    """½ (scaling · σ_j)² (u_jᵀ S u_j)(v_jᵀ A v_j) for the leading ``layer.rank`` SVD components of the
    layer's update (of ΔW − ΔW0 with ``unfold``): their second-order removal cost under the
    Kronecker-factored Fisher ``factors`` = (A, S) of :func:`kronecker_factors`."""
    P, sig, Q = layer_svd(layer, unfold)
    A, S = (f.to(P) for f in factors)
    out_side = ((S @ P) * P).sum(0)
    in_side = ((A @ Q) * Q).sum(0)
    return 0.5 * (layer.scaling * sig) ** 2 * out_side * in_side


# svd_allocation → (the statistics the trainer caches, the removal cost of a layer's components from them)
TAYLOR_KEYS = {"taylor": (weight_gradients, removal_costs), "fisher": (kronecker_factors, curvature_costs)}
