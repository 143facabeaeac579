"""Exact, atomic checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory::

    checkpoint/
      model.safetensors       adapter state (s, bases, their buffers) + modules_to_save, by name
      optimizer.safetensors   lower optimizer state by parameter name ("<name>/exp_avg", ...)
      fw.safetensors          Frank-Wolfe state tensors
      rng.safetensors         torch RNG states (CPU, CUDA)
      state.json              iteration, samplers, counters, ranks, FW state layout, config

It is written to a sibling temporary directory and swapped in with ``os.replace``: a crash while
saving leaves the previous checkpoint intact (at worst renamed to ``checkpoint.old``, which
:func:`resolve` falls back to). No pickle is used.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

FILES = ("model", "optimizer", "fw", "rng")


def _save_tensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def save(path: str, tensors: Dict[str, Dict[str, torch.Tensor]], meta: Dict[str, Any]) -> str:
    """Write ``tensors[group]`` (group in :data:`FILES`) and ``meta`` atomically to directory ``path``."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        for group, tree in tensors.items():
            if group not in FILES:
                raise ValueError(f"unknown checkpoint group {group!r}")
            _save_tensors(tree, os.path.join(tmp, f"{group}.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        old = path + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve(path: str) -> Optional[str]:
    """The usable checkpoint at ``path`` (or its ``.old`` sibling after an interrupted swap)."""
    for p in (path, path + ".old"):
        if os.path.isfile(os.path.join(p, "state.json")):
            return p
    return None


def load(path: str) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Any]]:
    found = resolve(path)
    if found is None:
        raise ValueError(f"no checkpoint at {path!r} (expected a directory with state.json written "
                         "by `debora train`)")
    tensors = {}
    for group in FILES:
        f = os.path.join(found, f"{group}.safetensors")
        tensors[group] = load_file(f) if os.path.isfile(f) else {}
    with open(os.path.join(found, "state.json"), "r", encoding="utf-8") as fh:
        meta = json.load(fh)
    return tensors, meta


# -- generic (de)serialisation of solver states without pickle -------------------------------------
def flatten_state(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """A JSON-able layout of ``obj`` (dataclass / NamedTuple / dict / list / tensor / scalar); tensors
    go into ``tensors`` under ``prefix``-based keys and are referenced from the layout."""
    import dataclasses
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": f"{type(obj).__module__}:{type(obj).__qualname__}",
                "fields": {f.name: flatten_state(getattr(obj, f.name), f"{prefix}.{f.name}", tensors)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"__namedtuple__": f"{type(obj).__module__}:{type(obj).__qualname__}",
                "fields": {k: flatten_state(getattr(obj, k), f"{prefix}.{k}", tensors) for k in obj._fields}}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__dict_items__": [[flatten_state(k, f"{prefix}.k{i}", tensors),
                                        flatten_state(v, f"{prefix}.v{i}", tensors)]
                                       for i, (k, v) in enumerate(obj.items())]}
        return {"__dict__": {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise a {type(obj).__name__} in a checkpoint without pickle")


def _locate(qualified: str):
    import importlib
    module, _, name = qualified.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def unflatten_state(layout: Any, tensors: Dict[str, torch.Tensor], device=None) -> Any:
    if isinstance(layout, dict):
        if "__tensor__" in layout:
            t = tensors[layout["__tensor__"]]
            return t.to(device) if device is not None else t
        if "__dataclass__" in layout or "__namedtuple__" in layout:
            cls = _locate(layout.get("__dataclass__") or layout["__namedtuple__"])
            kwargs = {k: unflatten_state(v, tensors, device) for k, v in layout["fields"].items()}
            if "__dataclass__" in layout:
                import dataclasses
                init = {f.name for f in dataclasses.fields(cls) if f.init}
                obj = cls(**{k: v for k, v in kwargs.items() if k in init})
                for k, v in kwargs.items():
                    if k not in init:
                        object.__setattr__(obj, k, v)
                return obj
            return cls(**kwargs)
        if "__dict__" in layout:
            return {k: unflatten_state(v, tensors, device) for k, v in layout["__dict__"].items()}
        if "__dict_items__" in layout:
            return {unflatten_state(k, tensors, device): unflatten_state(v, tensors, device)
                    for k, v in layout["__dict_items__"]}
    if isinstance(layout, dict) and "__list__" in layout:
        return [unflatten_state(v, tensors, device) for v in layout["__list__"]]
    if isinstance(layout, dict) and "__tuple__" in layout:
        return tuple(unflatten_state(v, tensors, device) for v in layout["__tuple__"])
    return layout


