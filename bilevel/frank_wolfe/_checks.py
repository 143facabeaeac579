"""Argument validation with messages that name the bad value and the fix (internal)."""
from __future__ import annotations

import math
import numbers

import torch


def check_dim(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}; a set needs at least one coordinate")
    return int(value)


def check_real(name: str, value, *, positive: bool = False, nonnegative: bool = False, hint: str = "") -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}{hint}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}{hint}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}{hint}")
    return value


def check_vector(name: str, v, dim: int, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """A 1-D floating tensor of length ``dim`` (on ``like``'s device, in ``like``'s dtype if given)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != dim:
        raise ValueError(f"{name} has shape {tuple(v.shape)}, expected ({dim},) (one entry per coordinate of "
                         f"the feasible set)")
    if not (v.is_floating_point()):
        raise TypeError(f"{name} must be a floating tensor, got dtype {v.dtype}")
    if like is not None:
        if v.device != like.device:
            raise ValueError(f"{name} is on {v.device} but the iterate is on {like.device}; move it with "
                             f"{name}.to({str(like.device)!r})")
        if v.dtype != like.dtype:
            v = v.to(like.dtype)
    return v


def check_finite(name: str, v: torch.Tensor, extra: str = "") -> None:
    """Raise if ``v`` has NaN/Inf, naming the first bad entry (one host sync).

    Fast path: one reduction (the sum is finite iff no entry is NaN/Inf, unless it overflows; an
    overflow falls through to the exact entrywise test)."""
    if bool(torch.isfinite(v.sum())):
        return
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        i = int(idx[0])
        raise ValueError(f"{name} contains non-finite values: {name}[{i}] = {v[i].item()!r} "
                         f"({idx.numel()} non-finite entr{'y' if idx.numel() == 1 else 'ies'}){extra}")
