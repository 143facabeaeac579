"""``merge_and_unload``: fold every adapter into its base layer and remove the adapters.

``W ← W + ΔW`` (ΔW = scaling·U diag(s) Vᵀ, transposed for Conv1D; the CP kernel for Conv2d).
For oblique/Stiefel bases the base weight already holds ``W0 − ΔW0`` (see
:mod:`debora.layers.base`), so the merged weight is ``W0 + ΔW − ΔW0``: the model's outputs are
unchanged by merging. The returned model is a plain model (no dEBORA attributes).
"""
from __future__ import annotations

from torch import nn

from .inject import _set_module
from .layers import adapter_layers


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer, in place; returns ``model``."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no dEBORA adapters to merge")
    for name, layer in layers.items():
        _set_module(model, name, layer.merged_base())
    for attr in ("debora_config", "debora_saved_modules"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
