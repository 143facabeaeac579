"""What resuming checks before any training state is touched.

* :func:`check_config` — the checkpoint's config against this run's: only :data:`RESUMABLE` fields
  (schedule, logging, device, output) may differ; any other difference is refused, naming each field
  with both values. A resumed run is therefore the run the checkpoint belongs to, and ``config.json``
  stays true.
* :func:`check_state` — ``state.json`` of a training checkpoint: every key the trainer reads is present
  and has the right type and range (``iteration`` an integer >= 0, samplers inside their split,
  layout consistent with ranks, ...), the tensor groups cover exactly the model's trainable
  parameters, the optimizer state names existing parameters, and the label names match this run's.

* :func:`check_fw` — the Frank-Wolfe state: its fields, ``x`` of the layout's size, barycentric
  weights >= 0 that combine to ``x`` in the feasible set, and ``x`` equal to the saved ``s``.

Each refusal is a ``ValueError`` naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

# fields that may differ between the run that wrote a checkpoint and the run resuming it
RESUMABLE = frozenset({
    "epochs", "max_iterations", "eval_every", "log_every", "checkpoint_every", "max_nonfinite",
    "eval_batch_size", "output_dir", "resume", "overwrite", "export_peft", "plots", "progress",
    "device", "threads", "bf16", "preset", "allow_many_classes",
})

# fields added after checkpoints were first written, with the value a checkpoint that lacks them ran
# with (not the current default: the lr schedule's default became "linear" after "constant" runs)
ABSENT_MEANS = {"lr_schedule": "constant", "warmup": 0.0, "fw_step_schedule": "constant"}


def saved_value(saved: Dict[str, Any], name: str, default: Any) -> Any:
    """The value of config field ``name`` in a saved config (a checkpoint's or a run's config.json)."""
    return saved[name] if name in saved else ABSENT_MEANS.get(name, default)


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def check_world_size(saved_world: Any, saved_batch: Any, world: int, batch_size: int, where: str,
                     has_dropout: bool = False) -> bool:
    """A resume with another number of processes N is exact only if the global batch N × batch_size
    is the one of the checkpoint (the samplers' positions are in global batches) and no draw of the
    per-process generators matters (no active dropout); otherwise it is refused. Returns whether N
    changed (then ``batch_size`` may differ from the checkpoint's)."""
    if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
        _fail(where, "world_size", "an integer >= 1", saved_world)
    if saved_world == world:
        return False
    old, new = saved_world * int(saved_batch), world * int(batch_size)
    if old != new:
        raise ValueError(f"cannot resume from {where}: it was written by {saved_world} process(es) with "
                         f"--batch-size {saved_batch} (global batch {old}), this run has {world} with "
                         f"--batch-size {batch_size} (global batch {new}). Another number of processes "
                         f"resumes exactly only with the same global batch: use --batch-size "
                         f"{old // world if old % world == 0 else '(none fits: ' + str(old) + ' is not a multiple of ' + str(world) + ')'}, "
                         f"or {saved_world} processes")
    if has_dropout:
        raise ValueError(f"cannot resume from {where} with {world} process(es): it was written by "
                         f"{saved_world}, and the model has active dropout, whose random masks depend on "
                         f"each process's generator; resume with {saved_world} processes")
    return True


def check_config(saved: Any, cfg, where: str, world_changed: bool = False) -> List[str]:
    """Refuse a resume whose config differs from the checkpoint's in a field outside
    :data:`RESUMABLE`; returns the resumable fields that differ (to be logged). With
    ``world_changed`` (:func:`check_world_size` passed), ``batch_size`` (per process) may differ."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: 'config' must be an object; the checkpoint is corrupted")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cfg)}
    current = cfg.to_dict()
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise ValueError(f"{where}: the checkpoint's config has fields this version does not know: "
                         f"{unknown}; resume with the debora version that wrote it")
    refused, allowed = [], []
    for name in current:
        old = _norm(saved_value(saved, name, defaults[name]))
        new = _norm(current[name])
        if old == new or (isinstance(old, (int, float)) and isinstance(new, (int, float))
                          and not isinstance(old, bool) and not isinstance(new, bool) and old == new):
            continue
        ok = name in RESUMABLE or (world_changed and name == "batch_size")
        (allowed if ok else refused).append(f"{name}: checkpoint {old!r}, now {new!r}")
    if refused:
        raise ValueError(f"cannot resume from {where}: the config differs in "
                         f"{'; '.join(refused)}. Only {sorted(RESUMABLE)} may change on resume; rerun "
                         "with the checkpoint's values, or start a new run in another --output-dir")
    return allowed


def _fail(where: str, key: str, want: str, got: Any) -> None:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise ValueError(f"{where}: {key!r} must be {want}, got {shown}; the checkpoint is corrupted or edited")


def _int(obj: Dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    if key not in obj:
        raise ValueError(f"{where}: the field {key!r} is missing; the checkpoint is corrupted or edited")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(where, key, f"an integer >= {minimum}", v)
    return v


def _get(obj: Dict[str, Any], key: str, where: str, types, want: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: the field {key!r} is missing; the checkpoint is corrupted or edited")
    v = obj[key]
    if isinstance(v, bool) and bool not in types:
        _fail(where, key, want, v)
    if not isinstance(v, types):
        _fail(where, key, want, v)
    return v


ADAMW_FIELDS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
ADAMW_REQUIRED = {"step", "exp_avg", "exp_avg_sq"}


def check_optimizer(opt_tensors: Dict[str, Any], scalars: Dict[str, Any], model_tensors: Dict[str, Any],
                    lower: set, path: str) -> None:
    """The AdamW state: entries ``"<parameter>|<field>"`` name lower-level parameters and AdamW fields;
    a parameter with state has at least step, exp_avg and exp_avg_sq; moments have the parameter's
    shape; step is a number >= 0."""
    where = os.path.join(path, "optimizer.safetensors")
    fields: Dict[str, set] = {}
    for key in list(opt_tensors) + list(scalars):
        pname, sep, field = key.partition("|")
        if not sep or pname not in lower:
            raise ValueError(f"{where}: entry {key!r} names no lower-level parameter of this model; the "
                             "checkpoint is corrupted or edited")
        if field not in ADAMW_FIELDS:
            raise ValueError(f"{where}: entry {key!r}: {field!r} is not an AdamW state field "
                             f"{sorted(ADAMW_FIELDS)}; the checkpoint is corrupted or edited")
        fields.setdefault(pname, set()).add(field)
        value = opt_tensors[key] if key in opt_tensors else scalars[key]
        if field == "step":
            number = float(value) if hasattr(value, "numel") and value.numel() == 1 else value
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
                raise ValueError(f"{where}: {key!r} must be a step count >= 0, got {value!r}")
        elif key not in opt_tensors or (pname in model_tensors
                                        and tuple(value.shape) != tuple(model_tensors[pname].shape)):
            raise ValueError(f"{where}: {key!r} must be a tensor of the parameter's shape "
                             f"{tuple(model_tensors[pname].shape) if pname in model_tensors else '?'}; the "
                             "checkpoint is corrupted or edited")
    for pname, have in fields.items():
        if not ADAMW_REQUIRED <= have:
            raise ValueError(f"{where}: the AdamW state of {pname!r} lacks {sorted(ADAMW_REQUIRED - have)}; "
                             "the checkpoint is corrupted or edited")


def check_state(meta: Dict[str, Any], tensors: Dict[str, Dict[str, Any]], path: str, *,
                upper: List[str], lower: List[str], split_sizes: Dict[str, int],
                label_names: Optional[List[str]] = None) -> None:
    """Validate a training checkpoint's ``state.json`` (``meta``) and tensor groups against the model
    (``upper``/``lower``: its parameter names) and the data (``split_sizes`` of d1/d2/d2_est)."""
    where = os.path.join(path, "state.json")
    _int(meta, "iteration", where)
    _int(meta, "skipped_lower", where)
    _int(meta, "skipped_upper", where)
    _get(meta, "s_frozen", where, (bool,), "true or false")
    if _get(meta, "last_gap", where, (int, float, type(None)), "a number or null") is not None:
        pass
    elapsed = _get(meta, "elapsed", where, (int, float), "a number >= 0")
    if elapsed < 0:
        _fail(where, "elapsed", "a number >= 0", elapsed)
    history = _get(meta, "history", where, (dict,), "an object")
    for key in ("eval_start", "eval_end", "eval_best", "counts_start", "ranks_start"):
        if key in history and not isinstance(history[key], dict):
            _fail(where, f"history.{key}", "an object", history[key])
    _get(meta, "fw_layout", where, (dict,), "an object (the Frank-Wolfe state layout)")
    ranks = _get(meta, "ranks", where, (dict,), "an object of adapter name -> rank")
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            _fail(where, f"ranks.{name}", "an integer >= 0", r)
    # layout of s: names, sizes and component ids agree with each other and with the ranks
    lay = _get(meta, "layout", where, (dict,), "an object")
    names = _get(lay, "names", where + " layout", (list,), "a list of names")
    sizes = _get(lay, "sizes", where + " layout", (list,), "a list of sizes")
    ids = _get(lay, "ids", where + " layout", (dict,), "an object")
    if (len(names) != len(sizes) or set(ids) != set(names)
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in sizes)
            or any(not isinstance(ids[n], list) or len(ids[n]) != k for n, k in zip(names, sizes))):
        raise ValueError(f"{where}: 'layout' names, sizes and ids disagree; the checkpoint is corrupted or "
                         "edited")
    if set(names) != set(upper):
        raise ValueError(f"{where}: the s blocks {sorted(names)[:4]} ... do not match this model's "
                         f"{sorted(upper)[:4]} ...; resume with the same model and target modules")
    for n, k in zip(names, sizes):
        layer = n[:-2] if n.endswith(".s") else n
        if ranks.get(layer, k) != k:
            raise ValueError(f"{where}: layer {layer!r} has rank {ranks.get(layer)} but its s block has "
                             f"{k} entries; the checkpoint is corrupted or edited")
    samplers = _get(meta, "samplers", where, (dict,), "an object")
    for key, n in split_sizes.items():
        sp = _get(samplers, key, where + " samplers", (dict,), "an object")
        _int(sp, "epoch", f"{where} samplers.{key}")
        off = _int(sp, "offset", f"{where} samplers.{key}")
        if off > n:
            _fail(f"{where} samplers.{key}", "offset", f"<= {n} (the split's size)", off)
    opt = _get(meta, "optimizer", where, (dict,), "an object")
    groups = _get(opt, "param_groups", where + " optimizer", (list,), "a list")
    scal = _get(opt, "step_scalar", where + " optimizer", (dict,), "an object")
    lower_set = set(lower)
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            _fail(where, f"optimizer.param_groups[{i}]", "an object with 'params'", g)
        for k, v in g.items():
            if k != "params" and not (v is None or isinstance(v, (bool, int, float, str, list))):
                _fail(where, f"optimizer.param_groups[{i}].{k}", "plain data", v)
    # tensors: the model group covers exactly the trainable parameters; optimizer keys name them
    model_keys = set(tensors.get("model", {}))
    expected = set(upper) | lower_set
    if model_keys != expected:
        missing, extra = sorted(expected - model_keys), sorted(model_keys - expected)
        raise ValueError(f"{os.path.join(path, 'model.safetensors')} does not match this model: missing "
                         f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
                         f"{extra[:4]}{' ...' if len(extra) > 4 else ''}; resume with the same model and "
                         "target modules")
    check_optimizer(tensors.get("optimizer", {}), scal, tensors.get("model", {}), lower_set, path)
    rng = tensors.get("rng", {})
    if "torch_cpu" not in rng:
        raise ValueError(f"{os.path.join(path, 'rng.safetensors')} lacks 'torch_cpu'; the checkpoint is "
                         "corrupted")
    if label_names is not None and "labels" in meta and list(meta["labels"]) != list(label_names):
        raise ValueError(f"{where}: the checkpoint was trained on the classes {meta['labels'][:8]}, this "
                         f"run's data has {list(label_names)[:8]}; resume on the same data")


def check_fw(fields: Any, feasible, layout, model_tensors: Dict[str, Any], path: str) -> None:
    """The rebuilt Frank-Wolfe state ``fields`` (x, weights, n, rule_state) is consistent with the
    feasible set, the s layout and the saved s (``model_tensors``), before any of it is used."""
    import torch
    where = os.path.join(path, "state.json") + " fw_layout"
    if not isinstance(fields, dict) or set(fields) != {"x", "weights", "n", "rule_state"}:
        raise ValueError(f"{where}: the Frank-Wolfe state must have the fields x, weights, n, rule_state; "
                         "the checkpoint is corrupted or edited")
    x, w, n = fields["x"], fields["weights"], fields["n"]
    if not (torch.is_tensor(x) and torch.is_tensor(w) and x.is_floating_point() and w.is_floating_point()):
        raise ValueError(f"{where}: x and weights must be floating-point tensors")
    if x.shape != (layout.total,):
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}, the s layout needs ({layout.total},); the "
                         "checkpoint is corrupted or edited")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        _fail(where, "n", "an integer >= 0", n)
    try:
        combined = feasible.combine(w.to(device=x.device, dtype=x.dtype))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: the barycentric weights do not fit the feasible set ({err})") from None
    tol = 1e-5 * max(1.0, float(x.abs().max())) if x.numel() else 0.0
    if bool((w < 0).any()) or (x.numel() and float((combined - x).abs().max()) > tol):
        raise ValueError(f"{where}: the weights do not combine to x (or are negative); the checkpoint is "
                         "corrupted or edited")
    if x.numel():
        s = torch.cat([model_tensors[name].reshape(-1).to(device=x.device, dtype=x.dtype)
                       for name in layout.names])
        if float((s - x).abs().max()) > tol:
            raise ValueError(f"{os.path.join(path, 'model.safetensors')}: the saved s differ from the "
                             "Frank-Wolfe iterate x in fw.safetensors; the checkpoint is corrupted or edited")
