"""Learning-rate schedules of the lower level: the multiplier of the configured lr at each lower step.

    factor(t) = t / w                                   for t < w (linear warm-up over w steps)
    linear:   max(0, (T − t) / (T − w))                 for t ≥ w (to 0 at the end of the run)
    cosine:   max(0, ½ (1 + cos(π (t − w) / (T − w))))  for t ≥ w
    constant: 1                                          for t ≥ w

with T the run's lower steps and w = round(warmup · T). These are the schedules of
``transformers.get_{constant,linear,cosine}_schedule_with_warmup`` (tests check them against those),
written as a pure function of the step so that the lr is part of no state: a resumed run, a
truncation that rebuilds parameter groups, or another process count gets the same lr at the same step.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.0) -> float:
    """η_t / η for lower step ``step`` (0-based) of ``total``; ``warmup`` is a fraction of ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if total < 1:
        raise ValueError(f"total lower steps must be >= 1, got {total!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup (a fraction of the run) must be in [0, 1), got {warmup!r}")
    w = int(round(warmup * total))
    if step < w:
        return step / max(1, w)
    if schedule == "constant":
        return 1.0
    progress = (step - w) / max(1, total - w)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
