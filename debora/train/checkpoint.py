"""Exact, atomic, verified checkpoints: safetensors for tensors, plain JSON for everything else.

A checkpoint is a directory::

    checkpoint/
      manifest.json           format, format_version, and the SHA-256 and size of every file below
      model.safetensors       adapter state (s, bases, their buffers) + modules_to_save, by name
      optimizer.safetensors   lower optimizer state by parameter name ("<name>|exp_avg", ...)
      fw.safetensors          Frank-Wolfe state tensors
      rng.safetensors         torch RNG states (CPU, CUDA; every rank's under torchrun)
      estimator.safetensors   the estimator's state: CG / fixed-point warm start, stochastic-neumann
                              generator (optional group; its counters are in state.json)
      state.json              iteration, samplers, counters, ranks, FW state layout, config

Writing: every tensor must be finite (:class:`NonFiniteCheckpoint` otherwise: a NaN is never saved);
the files go to a sibling temporary directory, the manifest is written last, and the directory is
swapped in with ``os.replace``: a crash while saving leaves the previous checkpoint intact (at worst
renamed to ``checkpoint.old``, which :func:`resolve` falls back to). Leftover ``checkpoint.tmp-*``
directories of a killed write are removed by the next :func:`save` or :func:`load`.

Reading (:func:`load`) refuses, with a ``ValueError`` naming the file: a missing manifest, another
format or version, a missing file, a size or SHA-256 mismatch, unreadable safetensors or JSON, a
missing tensor group, NaN/Inf tensors.

No code is run while reading: tensors come from safetensors; ``state.json`` is plain JSON. Solver
states (dataclasses / NamedTuples such as the Frank-Wolfe step rule's state) are stored by
:func:`flatten_state` as ``{"__type__": NAME, "fields": {...}}`` and rebuilt only if ``NAME`` is in the
allow-list of state types (:func:`register_state_type`); their fields must be exactly the type's
fields, and their values plain data or tensors. Nothing is imported or called by a name read from
the file. To add state to the format (per-rank RNG states, an estimator's state): add a tensor group
(any ``[a-z0-9_]+`` name) and plain JSON entries, and register any new state type in code.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from debora.io import _sha256   # one file-hashing routine for adapters and checkpoints

FORMAT = "debora-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STATE = "state.json"
FILES = ("model", "optimizer", "fw", "rng")       # tensor groups a training checkpoint must have
_GROUP = re.compile(r"^[a-z0-9_]+$")


class NonFiniteCheckpoint(FloatingPointError):
    """Refusal to write a checkpoint that holds NaN or Inf values."""




def nonfinite_names(tensors: Dict[str, torch.Tensor]) -> list:
    """Names of the floating-point tensors of ``tensors`` that hold NaN or Inf (one host sync)."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[k]).all().to("cpu") for k in names]).tolist()
    return [k for k, good in zip(names, ok) if not good]


def _nonfinite_float(obj: Any, where: str) -> Optional[str]:
    """The path of the first non-finite float in the JSON-able ``obj``, or ``None``."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _nonfinite_float(v, f"{where}.{k}")
        if found is not None:
            return found
    return None


def _save_tensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def cleanup_tmp(path: str) -> list:
    """Remove ``<path>.tmp-*`` directories left by a write that was killed; returns what was removed."""
    path = os.path.abspath(path)
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def save(path: str, tensors: Dict[str, Dict[str, torch.Tensor]], meta: Dict[str, Any]) -> str:
    """Write ``tensors[group]`` (one safetensors file per group), ``meta`` (state.json) and the
    manifest atomically to directory ``path``. Raises :class:`NonFiniteCheckpoint` (nothing written)
    if any floating-point tensor holds NaN or Inf."""
    for group in tensors:
        if not _GROUP.match(group):
            raise ValueError(f"checkpoint group {group!r} must match [a-z0-9_]+")
    bad = {g: nonfinite_names(t) for g, t in tensors.items()}
    bad = {g: names for g, names in bad.items() if names}
    if bad:
        listing = "; ".join(f"{g}: {names[:3]}{' ...' if len(names) > 3 else ''}" for g, names in bad.items())
        raise NonFiniteCheckpoint(f"refusing to write checkpoint {path!r}: NaN/Inf values in {listing}; "
                                  "the previous checkpoint (if any) is kept")
    where = _nonfinite_float(meta, "state")
    if where is not None:
        raise NonFiniteCheckpoint(f"refusing to write checkpoint {path!r}: {where} is NaN/Inf")
    text = json.dumps(meta, indent=1, allow_nan=False)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    cleanup_tmp(path)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        names = []
        for group, tree in tensors.items():
            _save_tensors(tree, os.path.join(tmp, f"{group}.safetensors"))
            names.append(f"{group}.safetensors")
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        names.append(STATE)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "files": {n: {"sha256": _sha256(os.path.join(tmp, n)),
                                  "bytes": os.path.getsize(os.path.join(tmp, n))} for n in names}}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
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
    """The checkpoint directory at ``path`` (or its ``.old`` sibling after an interrupted swap), or
    ``None`` if neither exists. Whether it is complete and intact is checked by :func:`load`."""
    for p in (path, path + ".old"):
        if os.path.isdir(p):
            return p
    return None


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err}); the checkpoint is corrupted") from None


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def verify(path: str, required: Iterable[str] = FILES) -> Dict[str, Any]:
    """Check the manifest of checkpoint directory ``path``; returns it. Raises ``ValueError`` naming
    the file for: no manifest, wrong format/version, a missing required group, a missing file, a size
    or checksum mismatch."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        hint = (" (it has state.json but no manifest: written by an older debora, which cannot be "
                "verified; start a new run)" if os.path.isfile(os.path.join(path, STATE)) else "")
        raise ValueError(f"{mpath} is missing: {path!r} is not a complete checkpoint written by "
                         f"`debora train`{hint}")
    manifest = _read_json(mpath, "the checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath} is not a dEBORA checkpoint manifest (format="
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                         f"{FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{mpath} has format_version={manifest.get('format_version')!r}; this version of "
                         f"debora reads checkpoint format_version {FORMAT_VERSION} only")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("bytes"), int) for k, v in files.items()):
        raise ValueError(f"{mpath}: 'files' must map file names to {{'sha256', 'bytes'}}; the manifest is "
                         "corrupted")
    needed = [STATE] + [f"{g}.safetensors" for g in required]
    for name in needed:
        if name not in files:
            raise ValueError(f"{mpath} does not list {name}; the checkpoint is incomplete")
    for name, entry in files.items():
        if os.path.basename(name) != name or name in (MANIFEST, "", ".", ".."):
            raise ValueError(f"{mpath} lists an invalid file name {name!r}")
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise ValueError(f"{f} is missing; the checkpoint is incomplete (refusing to resume from it)")
        size = os.path.getsize(f)
        if size != entry["bytes"]:
            raise ValueError(f"{f} has {size} bytes but the manifest records {entry['bytes']}: truncated or "
                             "replaced file (refusing to resume from it)")
        if _sha256(f) != entry["sha256"]:
            raise ValueError(f"{f} does not match its SHA-256 in {MANIFEST}: corrupted or replaced file "
                             "(refusing to resume from it)")
    return manifest


def load(path: str, required: Iterable[str] = FILES
         ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Any]]:
    """``(tensors by group, state.json)`` of the verified checkpoint at ``path`` (see :func:`verify`)."""
    found = resolve(path)
    if found is None:
        raise ValueError(f"no checkpoint at {path!r} (expected a directory written by `debora train`)")
    cleanup_tmp(path)
    manifest = verify(found, required)
    tensors = {}
    for name in manifest["files"]:
        if not name.endswith(".safetensors"):
            continue
        f = os.path.join(found, name)
        try:
            tensors[name[:-len(".safetensors")]] = load_file(f)
        except Exception as err:   # safetensors raises its own error type for malformed headers
            raise ValueError(f"{f} is not a readable safetensors file ({err})") from None
    for group, tree in tensors.items():
        bad = nonfinite_names(tree)
        if bad:
            raise ValueError(f"{os.path.join(found, group + '.safetensors')} holds NaN/Inf values (e.g. "
                             f"{bad[:3]}); refusing to resume from it")
    meta = _read_json(os.path.join(found, STATE), "the checkpoint state")
    if not isinstance(meta, dict):
        raise ValueError(f"{os.path.join(found, STATE)} must hold a JSON object, got "
                         f"{type(meta).__name__}; the checkpoint is corrupted")
    return tensors, meta


# -- plain-data (de)serialisation of solver states -------------------------------------------------
STATE_TYPES: Dict[str, type] = {}


def register_state_type(cls: type, name: Optional[str] = None) -> type:
    """Allow instances of the dataclass or NamedTuple ``cls`` in checkpoints, under ``name`` (default
    the class name). Only registered types are rebuilt on load; usable as a class decorator."""
    is_nt = issubclass(cls, tuple) and hasattr(cls, "_fields")
    if not (dataclasses.is_dataclass(cls) or is_nt):
        raise TypeError(f"{cls!r} is neither a dataclass nor a NamedTuple; store plain data instead")
    key = name or cls.__name__
    if STATE_TYPES.get(key, cls) is not cls:
        raise ValueError(f"state type name {key!r} is already registered for {STATE_TYPES[key]!r}")
    STATE_TYPES[key] = cls
    return cls


def _type_name(cls: type) -> Optional[str]:
    return next((k for k, v in STATE_TYPES.items() if v is cls), None)


def _fields(cls: type) -> list:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    return list(cls._fields)


def flatten_state(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """A JSON-able layout of ``obj`` (registered state type / dict / list / tuple / tensor / scalar);
    tensors go into ``tensors`` under ``prefix``-based keys and are referenced from the layout."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if (dataclasses.is_dataclass(obj) and not isinstance(obj, type)) or (
            isinstance(obj, tuple) and hasattr(obj, "_fields")):
        name = _type_name(type(obj))
        if name is None:
            raise TypeError(f"cannot store a {type(obj).__qualname__} in a checkpoint: register it with "
                            "debora.train.checkpoint.register_state_type (or store plain data)")
        return {"__type__": name, "fields": {k: flatten_state(getattr(obj, k), f"{prefix}.{k}", tensors)
                                             for k in _fields(type(obj))}}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__dict_items__": [[flatten_state(k, f"{prefix}.k{i}", tensors),
                                        flatten_state(v, f"{prefix}.v{i}", tensors)]
                                       for i, (k, v) in enumerate(obj.items())]}
        return {"__dict__": {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise NonFiniteCheckpoint(f"refusing to store the non-finite value {obj} at {prefix!r}")
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint: use plain data "
                    "(None, bool, int, float, str, list, dict), tensors, or a registered state type")


_MARKERS = ("__tensor__", "__type__", "__dict__", "__dict_items__", "__list__", "__tuple__")


def unflatten_state(layout: Any, tensors: Dict[str, torch.Tensor], device=None, where: str = "state") -> Any:
    """Rebuild what :func:`flatten_state` stored. Raises ``ValueError`` (naming ``where``) for an
    unknown marker, a state type outside the allow-list, wrong fields, or a missing tensor."""
    if layout is None or isinstance(layout, (bool, int, float, str)):
        return layout
    if not isinstance(layout, dict):
        raise ValueError(f"{where}: unexpected {type(layout).__name__} in a state layout")
    markers = [k for k in layout if k in _MARKERS]
    if len(markers) != 1 or (markers[0] != "__type__" and len(layout) != 1) or (
            markers[0] == "__type__" and set(layout) != {"__type__", "fields"}):
        raise ValueError(f"{where}: not a state layout entry (keys {sorted(layout)[:6]}); the checkpoint "
                         "is corrupted or was not written by debora")
    kind, value = markers[0], layout[markers[0]]
    if kind == "__tensor__":
        if not isinstance(value, str) or value not in tensors:
            raise ValueError(f"{where}: refers to tensor {value!r}, which the checkpoint does not hold")
        t = tensors[value]
        return t.to(device) if device is not None else t
    if kind == "__type__":
        cls = STATE_TYPES.get(value) if isinstance(value, str) else None
        if cls is None:
            raise ValueError(f"{where}: state type {value!r} is not in the allow-list "
                             f"{sorted(STATE_TYPES)}; refusing to rebuild it (nothing is imported or "
                             "called by a name read from a checkpoint)")
        fields = layout["fields"]
        expected = _fields(cls)
        if not isinstance(fields, dict) or set(fields) != set(expected):
            raise ValueError(f"{where}: {value} needs exactly the fields {expected}, the checkpoint has "
                             f"{sorted(fields) if isinstance(fields, dict) else fields!r}")
        return cls(**{k: unflatten_state(v, tensors, device, f"{where}.{k}") for k, v in fields.items()})
    if kind == "__dict__":
        if not isinstance(value, dict):
            raise ValueError(f"{where}: __dict__ must hold an object")
        return {k: unflatten_state(v, tensors, device, f"{where}.{k}") for k, v in value.items()}
    if not isinstance(value, list):
        raise ValueError(f"{where}: {kind} must hold a list")
    if kind == "__dict_items__":
        out = {}
        for i, item in enumerate(value):
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError(f"{where}: __dict_items__ must hold [key, value] pairs")
            k = unflatten_state(item[0], tensors, device, f"{where}.k{i}")
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise ValueError(f"{where}: dict keys must be plain scalars")
            out[k] = unflatten_state(item[1], tensors, device, f"{where}.v{i}")
        return out
    items = [unflatten_state(v, tensors, device, f"{where}.{i}") for i, v in enumerate(value)]
    return items if kind == "__list__" else tuple(items)


def _register_builtin_types() -> None:
    from bilevel.frank_wolfe.steps import ShortStepState
    register_state_type(ShortStepState)


_register_builtin_types()
