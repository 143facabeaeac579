"""Type coercion and range checks of every :class:`~debora.train.config.TrainConfig` field.

Run first by ``TrainConfig.validate``. Each field is coerced by its declared type, so that values
from YAML/JSON files are usable whatever their spelling (YAML 1.1 reads ``1e-3`` as a string):

* ``float`` fields take numbers and numeric strings, and must be finite (``nan``/``inf`` refused);
* ``int`` fields take integers, integral floats and integer strings (``True`` is not an integer);
* ``bool`` fields take ``true``/``false`` (and those strings); ``str`` fields take strings;
* ``Optional[...]`` fields also take ``None``.

Then the ranges that the rest of ``validate`` does not cover: ``head_lr`` > 0, ``alpha`` > 0,
``seed`` >= 0, ``max_eval_examples`` >= 1, ``epochs`` <= 1e6, numeric ``estimator_options`` finite.
A value that cannot be coerced raises ``TypeError`` naming the field, the value and the expected type;
a value out of range raises ``ValueError`` naming the field and the allowed range.
"""
from __future__ import annotations

import math
import typing
from typing import Any, Tuple

MAX_EPOCHS = 1e6


def _kind(hint: Any) -> Tuple[str, bool]:
    """``(base kind, optional)`` of a field's type hint; kind in float/int/bool/str/number/other."""
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if sorted(a.__name__ for a in args if isinstance(a, type)) == ["float", "int"]:
            return "number", optional
        hint = args[0] if len(args) == 1 else hint
    if hint in (float, int, bool, str):
        return hint.__name__, optional
    return "other", optional


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {v!r} (a bool)")
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise TypeError(f"{name} must be a number, got the string {v!r}") from None
    else:
        raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return f


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {v!r} (a bool)")
    if isinstance(v, int):
        return v
    f = _as_float(name, v) if isinstance(v, (float, str)) else None
    if f is None:
        raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    if not f.is_integer():
        raise TypeError(f"{name} must be an integer, got {v!r}")
    return int(f)


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise TypeError(f"{name} must be true or false, got {v!r} ({type(v).__name__})")


def coerce_value(name: str, hint: Any, value: Any) -> Any:
    kind, optional = _kind(hint)
    if value is None:
        if optional or kind == "other":
            return None
        raise TypeError(f"{name} must not be None (null); give a value or leave the field out")
    if kind == "float":
        return _as_float(name, value)
    if kind == "int":
        return _as_int(name, value)
    if kind == "bool":
        return _as_bool(name, value)
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
        return value
    if kind == "number":   # int or float (e.g. truncate_from): keep an integer an integer
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        return _as_float(name, value)
    return value


def check_fields(cfg) -> None:
    """Coerce every field of ``cfg`` in place by its type hint, then check the extra ranges."""
    hints = typing.get_type_hints(type(cfg))
    for name, hint in hints.items():
        setattr(cfg, name, coerce_value(name, hint, getattr(cfg, name)))
    if cfg.head_lr is not None and cfg.head_lr <= 0:
        raise ValueError(f"head_lr must be > 0 (or unset to use lr), got {cfg.head_lr!r}")
    if cfg.alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {cfg.alpha!r}")
    if cfg.seed < 0:
        raise ValueError(f"seed must be >= 0, got {cfg.seed!r}")
    if cfg.max_eval_examples is not None and cfg.max_eval_examples < 1:
        raise ValueError(f"max_eval_examples must be >= 1 or None, got {cfg.max_eval_examples!r}")
    if cfg.epochs > MAX_EPOCHS:
        raise ValueError(f"epochs must be <= {MAX_EPOCHS:g}, got {cfg.epochs!r}; cap the run with "
                         "max_iterations instead")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
    opts = cfg.estimator_options
    if opts is None:
        cfg.estimator_options = opts = {}
    if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
        raise TypeError(f"estimator_options must be a mapping of option names to values, got {opts!r}")
    for k, v in opts.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"estimator_options[{k!r}] must be finite, got {v!r}")
    tm = cfg.target_modules
    if tm is not None and not isinstance(tm, str) and not (
            isinstance(tm, (list, tuple)) and all(isinstance(t, str) for t in tm)):
        raise TypeError(f"target_modules must be a list of module names or a regex string, got {tm!r}")
    ms = cfg.modules_to_save
    if ms is not None and not (isinstance(ms, (list, tuple)) and all(isinstance(t, str) for t in ms)):
        raise TypeError(f"modules_to_save must be a list of module names, got {ms!r}")
