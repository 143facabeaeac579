"""Truncation (paper, Algorithm 1 step 7): physically remove components whose weight sits at the floor.

    report = debora.truncate(model, atol=1e-6)            # eps from the model's DeboraConfig
    report = debora.truncate(model, optimizer=opt)        # also trims that optimizer's state

A component i of a layer is removed when ``s_i ≤ ε + atol``. Its basis columns and its entry of s go;
the layer's Parameters are replaced by new, smaller tensors (so parameter count and FLOPs really drop).
The report maps each *changed* layer name to ``Truncation(kept, removed)`` (LongTensors of indices
into the layer's components before the call; unpack as ``kept, removed = report[name]``).
Parameter names stay ``"<layer>.s"``, ``"<layer>.U"``, … so optimizer state can be rebuilt by name;
pass ``optimizer=`` to have it done here (Parameter swapped in its param groups, state tensors of
the parameter's shape sliced along the component axis).

Rank 0 is allowed (``min_rank=0``, the default): the layer then computes ``base(x)`` only and
contributes nothing to s. Pass ``min_rank=1`` to always keep the largest component.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from .inject import get_config
from .layers import adapter_layers


class Truncation(NamedTuple):
    kept: torch.Tensor      # LongTensor, indices kept (ascending)
    removed: torch.Tensor   # LongTensor, indices removed (ascending)


@torch.no_grad()
def truncate(model: nn.Module, atol: float = 1e-6, *, eps: Optional[float] = None, min_rank: int = 0,
             optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Truncation]:
    """Remove every component with ``s_i ≤ eps + atol`` (``eps`` defaults to the config's ε)."""
    if eps is None:
        eps = get_config(model).eps
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    if min_rank < 0:
        raise ValueError(f"min_rank must be >= 0, got {min_rank!r}")
    report: Dict[str, Truncation] = {}
    for name, layer in adapter_layers(model).items():
        s = layer.s.detach()
        at_floor = s <= eps + atol
        if min_rank > 0 and (~at_floor).sum() < min_rank and s.numel() > 0:
            keep_top = torch.topk(s, min(min_rank, s.numel())).indices
            at_floor[keep_top] = False
        if not bool(at_floor.any()):
            continue
        kept = torch.nonzero(~at_floor).flatten().cpu()
        removed = torch.nonzero(at_floor).flatten().cpu()
        old = {"s": layer.s, **{b: getattr(layer, b) for b in layer.basis_names}}
        layer.keep_(kept)
        report[name] = Truncation(kept, removed)
        if optimizer is not None:
            for pname, p_old in old.items():
                _swap_in_optimizer(optimizer, p_old, getattr(layer, pname), kept,
                                   dim=0 if pname == "s" else 1)
    return report


def _swap_in_optimizer(opt: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                       kept: torch.Tensor, dim: int) -> None:
    found = False
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    if not found:
        return
    state = opt.state.pop(old, None)
    if state is None:
        return
    idx = kept.to(new.device)
    opt.state[new] = {k: (v.index_select(dim, idx).clone()
                          if isinstance(v, torch.Tensor) and v.shape == old.shape else v)
                      for k, v in state.items()}
