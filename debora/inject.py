"""Put dEBORA adapters into a model, and read its upper / lower variables.

    model = debora.inject(model, cfg)          # in place; returns the same model
    debora.upper_parameters(model)             # {"<layer>.s": Parameter}            (paper: s)
    debora.lower_parameters(model)             # {"<layer>.U", "<layer>.V", … , saved-module params}
    debora.rank_pattern(model)                 # {"<layer>": current rank}

Names are those of ``model.named_parameters()`` (e.g. ``"encoder.layer.0.attention.self.query.s"``,
``"….query.U"``; the frozen base weight becomes ``"….query.base.weight"``), in model order. The dicts
hold the live ``nn.Parameter`` objects (build optimizers from them; detach before handing them to
``torch.func`` transforms). After :func:`debora.truncate` the Parameter objects are new: call these
functions again.

``requires_grad`` after injection: bases and modules_to_save ``True``; ``s`` and everything else
``False`` (s is moved by Frank-Wolfe only).

Initial s (a feasible point of the floored simplex, the barycentre of its vertices):
``per_layer``: ``s0 = ε + τ/(r0 + 1)``; ``global``: ``s0 = ε + τ/(R + 1)`` with R the total number of
components over all layers.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import DeboraConfig
from .layers import AdapterLayer, adapter_layers, make_adapter


def _match_list(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def matches_target(name: str, target_modules) -> bool:
    """PEFT rule: a regex string must match the full name; list entries match the name or a suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return _match_list(name, target_modules)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def initial_s(cfg: DeboraConfig, n_components: int) -> float:
    """``cfg.init_s`` if set (checked to fit the budget); else, with Euclidean bases, the barycentre of
    the floored simplex with ``n_components`` coordinates, ε + τ/(n+1), and with oblique/Stiefel bases a
    tenth of its excess over ε, ε + τ/(10(n+1)): those bases fold ΔW0 into the base weight, and a small
    s0 keeps ΔW0, and so the effect of removing a component later, small."""
    if cfg.init_s is None:
        bary = cfg.tau / (n_components + 1)
        return cfg.eps + (bary if cfg.basis == "euclidean" else bary / 10)
    if n_components * (cfg.init_s - cfg.eps) > cfg.tau * (1 + 1e-12):
        raise ValueError(f"init_s={cfg.init_s:g} is infeasible: {n_components} components x (init_s - eps) = "
                         f"{n_components * (cfg.init_s - cfg.eps):g} exceeds tau={cfg.tau:g}; lower init_s "
                         f"to at most {cfg.eps + cfg.tau / n_components:g} or raise tau")
    return cfg.init_s


def inject(model: nn.Module, cfg: DeboraConfig) -> nn.Module:
    """Wrap every module matching ``cfg.target_modules`` in a dEBORA adapter, in place.

    Freezes every parameter except the adapter bases and ``cfg.modules_to_save``. All checks (a
    target matches, each matched module is supported, ``init_rank`` fits every layer, modules_to_save
    exist) run before the model is changed.
    """
    if not isinstance(cfg, DeboraConfig):
        raise TypeError(f"cfg must be a DeboraConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if adapter_layers(model):
        raise ValueError("the model already has dEBORA adapters; inject once (or merge_and_unload first)")
    names = [n for n, _ in model.named_modules() if n]
    targets = [n for n in names if matches_target(n, cfg.target_modules)]
    if not targets:
        sample = ", ".join(names[:12]) + (" …" if len(names) > 12 else "")
        raise ValueError(f"no module of the model matches target_modules={cfg.target_modules!r}. "
                         f"Module names look like: {sample}")
    # every match must be a supported layer (a matched container raises a TypeError naming it)
    adapters = {}
    for n in targets:
        adapters[n] = make_adapter(n, model.get_submodule(n), cfg.basis, cfg.scaling)
        if cfg.init_rank > adapters[n].max_rank():
            raise ValueError(f"init_rank={cfg.init_rank} is too large for {n!r} "
                             f"({adapters[n].describe()}, basis={cfg.basis!r}): at most "
                             f"{adapters[n].max_rank()}. Lower init_rank or leave the layer out of "
                             "target_modules")
        if cfg.init_bases != "random" and cfg.init_rank > adapters[n].singular_rank_bound():
            raise ValueError(f"init_bases={cfg.init_bases!r} needs init_rank <= "
                             f"{adapters[n].singular_rank_bound()} for {n!r} ({adapters[n].describe()}: "
                             f"that many singular vectors), got init_rank={cfg.init_rank}. Lower "
                             "init_rank, use init_bases='random', or leave the layer out of target_modules")
    saved = []
    if cfg.modules_to_save:
        saved = [n for n in names if _match_list(n, cfg.modules_to_save)
                 and not any(n == t or n.startswith(t + ".") or t.startswith(n + ".") for t in targets)]
        if not saved:
            raise ValueError(f"no module matches modules_to_save={cfg.modules_to_save!r} (or it "
                             "overlaps target_modules)")
        # drop nested duplicates (keep outermost)
        saved = [n for n in saved if not any(n.startswith(o + ".") for o in saved if o != n)]
    # -- all checks passed: change the model ----------------------------------------------------
    gen = None
    if cfg.init_seed is not None:
        gen = torch.Generator().manual_seed(int(cfg.init_seed))
    total = cfg.init_rank * len(adapters)
    s0 = initial_s(cfg, cfg.init_rank if cfg.budget == "per_layer" else total)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in adapters.items():
        layer.init_(cfg.init_rank, s0, gen, cfg.init_bases)
        _set_module(model, n, layer)
    for n in saved:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    model.debora_config = cfg
    model.debora_saved_modules = saved
    return model


def get_config(model: nn.Module) -> DeboraConfig:
    cfg = getattr(model, "debora_config", None)
    if cfg is None:
        raise ValueError("this model has no dEBORA adapters; call debora.inject(model, cfg) first")
    return cfg


def saved_modules(model: nn.Module) -> List[str]:
    return list(getattr(model, "debora_saved_modules", []))


def upper_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{"<layer>.s": s}`` for every adapter layer, in model order (paper: the upper variable s)."""
    return {f"{n}.s": layer.s for n, layer in adapter_layers(model).items()}


def basis_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{"<layer>.U": U, "<layer>.V": V, …}`` for every adapter layer, in model order."""
    return {f"{n}.{b}": getattr(layer, b)
            for n, layer in adapter_layers(model).items() for b in layer.basis_names}


def lower_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Bases of every adapter and the parameters of ``modules_to_save``, in model order."""
    wanted = set(basis_parameters(model))
    prefixes = tuple(n + "." for n in saved_modules(model))
    return {n: p for n, p in model.named_parameters()
            if n in wanted or (prefixes and n.startswith(prefixes))}


def rank_pattern(model: nn.Module) -> Dict[str, int]:
    """``{layer name: current rank}``."""
    return {n: layer.rank for n, layer in adapter_layers(model).items()}


def print_trainable_parameters(model: nn.Module, file=None) -> Dict[str, int]:
    """Print and return parameter counts: lower (bases + saved modules), upper (s), all."""
    lower = sum(p.numel() for p in lower_parameters(model).values())
    upper = sum(p.numel() for p in upper_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    ranks = rank_pattern(model)
    print(f"trainable params (bases + saved modules): {lower:,} || rank weights s: {upper:,} || "
          f"all params: {total:,} || trainable%: {100.0 * (lower + upper) / max(total, 1):.4f} || "
          f"adapters: {len(ranks)}, total rank {sum(ranks.values())}", file=file)
    return {"lower": lower, "upper": upper, "all": total, "layers": len(ranks),
            "total_rank": sum(ranks.values())}
