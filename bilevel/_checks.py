"""Validation of numeric options, shared by every estimator, linear solver and bilevel solver.

Each check raises ``ValueError`` naming the option, the bad value and the accepted range; ``bool`` is
rejected where a number is expected (``True`` is an ``int`` in Python), and so are NaN and ±inf.
"""
from __future__ import annotations

import math
from typing import Optional


def number(name: str, value, *, positive: bool = False, nonnegative: bool = False,
           at_most: Optional[float] = None, below: Optional[float] = None, hint: str = "") -> float:
    """``value`` as a finite float in the requested range, else ``ValueError``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (not positive or value > 0) and (not nonnegative or value >= 0) \
        and (at_most is None or value <= at_most) and (below is None or value < below)
    if not ok:
        rng = _range(positive, nonnegative, at_most, below)
        raise ValueError(f"{name} must be {rng + ' and finite' if rng else 'a finite number'}, "
                         f"got {value!r}{hint}")
    return float(value)


def _range(positive, nonnegative, at_most, below) -> str:
    parts = []
    if positive:
        parts.append("> 0")
    if nonnegative:
        parts.append(">= 0")
    if at_most is not None:
        parts.append(f"<= {at_most:g}")
    if below is not None:
        parts.append(f"< {below:g}")
    return " and ".join(parts)


def integer(name: str, value, minimum: int = 0, hint: str = "") -> int:
    """``value`` as an ``int`` ≥ ``minimum`` (``bool`` and floats rejected), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    return int(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {tuple(options)}")
    return value
