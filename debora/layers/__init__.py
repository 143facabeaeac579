"""Adapter layers: :class:`MatrixAdapter` (Linear, Conv1D) and :class:`CPConv2dAdapter` (Conv2d)."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .base import AdapterLayer
from .conv import CPConv2dAdapter
from .linear import Conv1D, MatrixAdapter


def adapter_layers(model: nn.Module) -> Dict[str, AdapterLayer]:
    """``{module name: adapter layer}`` in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def make_adapter(name: str, module: nn.Module, basis: str, scaling: float) -> AdapterLayer:
    """The adapter class for ``module`` (``TypeError`` naming the module if unsupported)."""
    if isinstance(module, AdapterLayer):
        raise ValueError(f"module {name!r} already carries a dEBORA adapter; inject once, or call "
                         "merge_and_unload first")
    if isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)):
        return MatrixAdapter(module, basis, scaling)
    if isinstance(module, nn.Conv2d):
        return CPConv2dAdapter(module, basis, scaling, name=name)
    raise TypeError(f"module {name!r} matches target_modules but is a {type(module).__name__}; dEBORA "
                    "adapts nn.Linear, transformers Conv1D and nn.Conv2d only. Narrow target_modules "
                    "(e.g. a regex) so that it is not matched")


__all__ = ["AdapterLayer", "MatrixAdapter", "CPConv2dAdapter", "adapter_layers", "make_adapter"]
