"""Save and load dEBORA adapters: a versioned JSON config + safetensors weights (never pickle).

    debora.save_pretrained(model, "out/")        # out/debora_config.json, out/adapter_model.safetensors
    model = debora.from_pretrained(base_model, "out/")

``debora_config.json`` holds ``format`` (``"debora-adapter"``), ``format_version`` (currently 3), the
:class:`DeboraConfig`, one entry per adapter layer (class of the base layer, base weight shape, current
rank, scaling, basis, whether ΔW0 was folded into the base weight), the ``modules_to_save`` names, the
shape of every stored tensor, the SHA-256 of the weights file and (version 2) ``config_sha256``, the
SHA-256 of the config itself (its canonical JSON without that field), so that an edited or corrupted
``scaling``, rank or basis is refused like corrupted weights. The safetensors file holds, under
their model names, every layer's ``s`` and bases, the folded initial factors (``U0``, ``V0`` /
``A0`` … ``D0``, oblique/Stiefel only), the state of ``modules_to_save`` and (version 3) the running
statistics of the base model's BatchNorm layers (``running_mean``, ``running_var``,
``num_batches_tracked``; their names under ``batchnorm``). Fine-tuning changes those statistics (the
trainer recomputes them for the trained weights, :mod:`debora.train.batchnorm`), so without them a
loaded CNN would normalise with the pretrained ones and give other outputs than the saved model.

Saving refuses (``ValueError``) tensors holding NaN or Inf. Loading checks, *before the model is
touched*: format and version (1, 2 or 3), both checksums (a corrupted or truncated file is refused), that
every adapted layer exists in ``base_model`` with the same class and weight shape, that ``scaling``
equals the config's ``alpha / init_rank`` and is finite, that every tensor has the recorded shape and
is finite, that every ``s`` is >= 0, that every saved BatchNorm layer exists with the same number of
features and has running variances >= 0, and that there are no missing or extra tensors.
Any mismatch raises ``ValueError`` naming the problem. Tensors are cast to the dtype/device of the
base weights. Saving and loading in the same dtype is bit-exact.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Dict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import DeboraConfig
from .inject import _set_module, get_config, saved_modules
from .layers import adapter_layers, make_adapter

FORMAT = "debora-adapter"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
CONFIG_NAME = "debora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_digest(meta: Dict) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its own ``config_sha256`` field."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _nonfinite(tensors: Dict[str, torch.Tensor]) -> list:
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).tolist()
    return [k for k, good in zip(names, ok) if not good]


def _layer_kind(layer) -> str:
    return type(layer.base).__name__


def _batchnorm_names(model: nn.Module, saved) -> list:
    """BatchNorm layers with running statistics, outside ``modules_to_save`` (saved whole already)."""
    inside = tuple(m + "." for m in saved)
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None and n not in saved and not n.startswith(inside)]


def save_pretrained(model: nn.Module, path: str) -> None:
    """Write the adapters (and modules_to_save) of ``model`` to the directory ``path``."""
    from safetensors.torch import save_file

    cfg = get_config(model)
    layers = adapter_layers(model)
    tensors: Dict[str, torch.Tensor] = {}
    meta_layers = {}
    for name, layer in layers.items():
        meta_layers[name] = {"base_class": _layer_kind(layer),
                             "base_weight_shape": list(layer.weight_ref.shape),
                             "rank": layer.rank, "scaling": layer.scaling, "basis": layer.basis,
                             "folded": bool(layer.folded)}
        tensors[f"{name}.s"] = layer.s
        for b in layer.basis_names:
            tensors[f"{name}.{b}"] = getattr(layer, b)
        for b, t in layer.init_factors().items():
            tensors[f"{name}.{b}0"] = t
    saved = saved_modules(model)
    for mname in saved:
        for k, v in model.get_submodule(mname).state_dict().items():
            tensors[f"{mname}.{k}"] = v
    norms = _batchnorm_names(model, saved)
    for bname in norms:
        bn = model.get_submodule(bname)
        for k in BN_BUFFERS:
            tensors[f"{bname}.{k}"] = getattr(bn, k)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    bad = _nonfinite(tensors)
    if bad:
        raise ValueError(f"refusing to save adapters to {path!r}: {len(bad)} tensors hold NaN/Inf (e.g. "
                         f"{bad[:3]}); nothing was written")
    os.makedirs(path, exist_ok=True)
    wpath = os.path.join(path, WEIGHTS_NAME)
    save_file(tensors, wpath, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
            "layers": meta_layers, "modules_to_save": saved, "batchnorm": norms,
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "weights_file": WEIGHTS_NAME, "weights_sha256": _sha256(wpath)}
    meta["config_sha256"] = _config_digest(meta)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def read_adapter(path: str):
    """``(meta, tensors)`` of the adapter saved in ``path``, verified but not loaded into a model.

    ``meta`` is the parsed ``debora_config.json`` (``config``, ``layers`` with each layer's rank and
    basis, ``tensors`` with their shapes, ...); ``tensors`` maps model names to CPU tensors. The checks
    are those of :func:`from_pretrained` that need no base model: format and version, both checksums,
    every field present, no NaN/Inf. For inspecting a saved adapter (``benchmarks/adapter_coherence.py``).
    Raises ``ValueError`` naming the file and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cpath, wpath = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise ValueError(f"{p} does not exist; {path!r} is not a directory written by "
                             "debora.save_pretrained")
    try:
        with open(cpath) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cpath} is not valid JSON ({err}); the adapter config is corrupted") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cpath} is not a dEBORA adapter config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{cpath} has format_version={version!r}; this version of debora reads "
                         f"format_version {list(READABLE_VERSIONS)}")
    for key in ("config", "layers", "modules_to_save", "tensors", "weights_sha256") + (
            ("config_sha256",) if version >= 2 else ()) + (("batchnorm",) if version >= 3 else ()):
        if key not in meta:
            raise ValueError(f"{cpath} lacks the field {key!r}; the adapter config is corrupted")
    if version >= 2 and meta["config_sha256"] != _config_digest(meta):
        raise ValueError(f"{cpath} does not match its own checksum (config_sha256): the config (scaling, "
                         "ranks, basis, ...) was edited or corrupted")
    digest = _sha256(wpath)
    if digest != meta["weights_sha256"]:
        raise ValueError(f"{wpath} does not match the checksum recorded in {CONFIG_NAME} (corrupted or "
                         "replaced weights file)")
    try:
        tensors = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {wpath}: {err}") from None
    bad = _nonfinite(tensors)
    if bad:
        raise ValueError(f"{wpath} holds NaN/Inf values in {len(bad)} tensors (e.g. {bad[:3]}); refusing to "
                         "load it")
    return meta, tensors


def _validate(base_model: nn.Module, meta, tensors) -> DeboraConfig:
    cfg = DeboraConfig.from_dict(meta["config"])
    if adapter_layers(base_model):
        raise ValueError("base_model already has dEBORA adapters; load into a plain base model")
    modules = dict(base_model.named_modules())
    expected: Dict[str, list] = {}
    for name, info in meta["layers"].items():
        if name not in modules:
            raise ValueError(f"adapter layer {name!r} does not exist in base_model: wrong base model?")
        mod = modules[name]
        if type(mod).__name__ != info["base_class"]:
            raise ValueError(f"{name!r} is a {type(mod).__name__} in base_model but the adapter was "
                             f"saved for a {info['base_class']}: wrong base model?")
        wshape = list(getattr(mod, "weight").shape)
        if wshape != list(info["base_weight_shape"]):
            raise ValueError(f"{name!r} has weight shape {wshape} in base_model but the adapter was "
                             f"saved for {info['base_weight_shape']}: wrong base model?")
        scaling = info.get("scaling")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) \
                or abs(scaling - cfg.scaling) > 1e-9 * max(1.0, abs(cfg.scaling)):
            raise ValueError(f"adapter layer {name!r} has scaling={scaling!r}, but its config gives alpha/"
                             f"init_rank = {cfg.scaling!r}: the adapter config is corrupted or edited")
        layer = make_adapter(name, mod, info["basis"], info["scaling"])
        r = int(info["rank"])
        expected[f"{name}.s"] = [r]
        for b, shape in layer.basis_shapes(r).items():
            expected[f"{name}.{b}"] = list(shape)
        if info["folded"]:
            r0 = cfg.init_rank
            for b, shape in layer.basis_shapes(r0).items():
                expected[f"{name}.{b}0"] = list(shape)
    for mname in meta["modules_to_save"]:
        if mname not in modules:
            raise ValueError(f"module to save {mname!r} does not exist in base_model: wrong base model?")
        for k, v in modules[mname].state_dict().items():
            expected[f"{mname}.{k}"] = list(v.shape)
    norms = meta.get("batchnorm", [])
    if not isinstance(norms, list) or not all(isinstance(n, str) for n in norms):
        raise ValueError(f"the adapter config's batchnorm field must be a list of module names, got "
                         f"{norms!r}: the adapter config is corrupted")
    for bname in norms:
        mod = modules.get(bname)
        if not isinstance(mod, _BatchNorm) or not mod.track_running_stats or mod.running_mean is None:
            raise ValueError(f"BatchNorm layer {bname!r} of the adapter is "
                             f"{'missing' if mod is None else 'a ' + type(mod).__name__ + ', not a BatchNorm with running statistics,'}"
                             f" in base_model: wrong base model?")
        for k in BN_BUFFERS:
            expected[f"{bname}.{k}"] = list(getattr(mod, k).shape)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"adapter weights do not match base_model and config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for k, shape in expected.items():
        if list(tensors[k].shape) != shape:
            raise ValueError(f"tensor {k!r} has shape {list(tensors[k].shape)} in the weights file but "
                             f"{shape} is expected: wrong base model or corrupted file")
    for bname in norms:
        if bool((tensors[f"{bname}.running_var"] < 0).any()):
            raise ValueError(f"BatchNorm layer {bname!r} has negative running variances in the weights "
                             "file: the weights are corrupted or edited")
    for name in meta["layers"]:
        s = tensors[f"{name}.s"]
        if s.numel() and bool((s < 0).any()):
            raise ValueError(f"adapter layer {name!r} has negative rank weights s (min {float(s.min()):g}); "
                             "s must be >= 0: the weights are corrupted or edited")
    return cfg


def from_pretrained(base_model: nn.Module, path: str) -> nn.Module:
    """Load adapters saved by :func:`save_pretrained` into ``base_model`` (in place; returns it)."""
    meta, tensors = read_adapter(path)
    cfg = _validate(base_model, meta, tensors)
    for p in base_model.parameters():
        p.requires_grad_(False)
    for name, info in meta["layers"].items():
        layer = make_adapter(name, base_model.get_submodule(name), info["basis"], info["scaling"])
        ref = layer.weight_ref
        layer.empty_(int(info["rank"]))
        with torch.no_grad():
            layer.s.copy_(tensors[f"{name}.s"].to(ref))
            for b in layer.basis_names:
                getattr(layer, b).copy_(tensors[f"{name}.{b}"].to(ref))
        if info["folded"]:
            layer.fold_init_({b: tensors[f"{name}.{b}0"].to(ref) for b in layer.basis_names})
            layer.refolded = True    # its ΔW0 comes from the file, not from an injection's seed
        _set_module(base_model, name, layer)
    for mname in meta["modules_to_save"]:
        mod = base_model.get_submodule(mname)
        prefix = mname + "."
        mod.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                             and k[len(prefix):] in mod.state_dict()})
        for p in mod.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        for bname in meta.get("batchnorm", []):
            bn = base_model.get_submodule(bname)
            for k in BN_BUFFERS:
                getattr(bn, k).copy_(tensors[f"{bname}.{k}"])
    base_model.debora_config = cfg
    base_model.debora_saved_modules = list(meta["modules_to_save"])
    return base_model
