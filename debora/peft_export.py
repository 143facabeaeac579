"""Export dEBORA adapters as a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads.

    info = debora.export_peft(model, "lora_out/")
    peft_model = peft.PeftModel.from_pretrained(fresh_base_model, "lora_out/")   # same outputs

Per layer ``l`` of rank ``r_l`` (``rank_pattern``) with LoRA scale ``alpha_l / r_l = scaling``
(``alpha_pattern``, so ``alpha_l = scaling · r_l``):

* Linear / Conv1D: ``lora_A = Vᵀ`` (r × in), ``lora_B = U diag(s)`` (out × r).
* Conv2d (CP): PEFT's LoRA conv is ``lora_A`` = a kh×kw conv in → r followed by a 1×1 conv r → out;
  the CP adapter is exported exactly with ``lora_A[i] = b_i ⊗ c_i ⊗ d_i`` and ``lora_B = A diag(s)``.
  This is exact but not compact: r(in·kh·kw + out) numbers instead of r(in + out + kh + kw).
  **Not exportable** (``ValueError``): CP adapters on *dilated* convs and on ``nn.Conv2d`` subclasses
  that pad in their own forward (EfficientNet's TF-style "same" convs): PEFT's LoRA conv ignores the
  base layer's dilation and that padding, so PEFT's outputs would differ.
* Oblique / Stiefel bases: the base weight was folded (``W0 − ΔW0``), but PEFT loads onto the original
  ``W0``; the exported adapter is ``ΔW − ΔW0`` of rank ``r + r0`` (the initial factors appended with a
  minus sign), so outputs still agree.
* ``modules_to_save`` are exported as PEFT ``modules_to_save`` (full weights).
* Layers with nothing to export (rank 0 and not folded) are left out of ``target_modules``.

The target module names and pattern keys are the full module names (keys escaped as regexes).
"""
from __future__ import annotations

import os
import re
from typing import Dict

import torch
from torch import nn

from .inject import get_config, saved_modules
from .layers import CPConv2dAdapter, adapter_layers


def _lora_factors(layer):
    """``(lora_A, lora_B)`` with scale ``layer.scaling`` (lora_B carries s)."""
    f = {b: getattr(layer, b).detach() for b in layer.basis_names}
    parts = [(f, layer.s.detach())]
    init = layer.init_factors()
    if init:
        first = layer.basis_names[0]
        init = {b: t.detach() for b, t in init.items()}
        parts.append((init, torch.full((init[first].shape[1],), -1.0 / layer.scaling,
                                       dtype=init[first].dtype, device=init[first].device)))
    As, Bs = [], []
    for fac, s in parts:
        if isinstance(layer, CPConv2dAdapter):
            As.append(torch.einsum("ci,pi,qi->icpq", fac["B"], fac["C"], fac["D"]))
            Bs.append((fac["A"] * s)[:, :, None, None])
        else:
            As.append(fac["V"].transpose(0, 1))
            Bs.append(fac["U"] * s)
    return torch.cat(As, 0).contiguous(), torch.cat(Bs, 1).contiguous()


def export_peft(model: nn.Module, path: str) -> Dict[str, object]:
    """Write a PEFT LoRA adapter with the same outputs as ``model``; returns what was exported."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    get_config(model)
    layers = adapter_layers(model)
    bad = [n for n, l in layers.items() if isinstance(l, CPConv2dAdapter)
           and (tuple(l.base.dilation) != (1, 1) or l.mode != "factorised")]
    if bad:
        raise ValueError(f"cannot export the CP adapters of {bad} to PEFT LoRA: PEFT's LoRA conv ignores "
                         "the base layer's dilation and any padding done in a Conv2d subclass's own "
                         "forward (TF-style 'same'), so its outputs would differ. Use "
                         "debora.save_pretrained, or debora.merge_and_unload, for these models")
    tensors, ranks, alphas, targets, skipped = {}, {}, {}, [], []
    transposed = False
    for name, layer in layers.items():
        A, B = _lora_factors(layer)
        r = A.shape[0]
        if r == 0:
            skipped.append(name)
            continue
        targets.append(name)
        ranks[re.escape(name)] = int(r)
        alphas[re.escape(name)] = float(layer.scaling * r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        transposed |= bool(getattr(layer, "transposed", False))
    if not targets:
        raise ValueError("nothing to export: every adapter has rank 0")
    saved = saved_modules(model)
    for mname in saved:
        for k, v in model.get_submodule(mname).state_dict().items():
            tensors[f"base_model.model.{mname}.{k}"] = v
    max_r = max(ranks.values())
    cfg = LoraConfig(r=max_r, lora_alpha=max_r, target_modules=targets, rank_pattern=ranks,
                     alpha_pattern=alphas, lora_dropout=0.0, bias="none", fan_in_fan_out=transposed,
                     modules_to_save=saved or None, init_lora_weights=False)
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"path": path, "exported": targets, "skipped_rank0": skipped, "rank_pattern": ranks,
            "modules_to_save": saved}
