"""The rank budget as a count the user sets: ``target_rank`` with a cubic schedule (like AdaLoRA's).

The paper removes a component once Frank-Wolfe has driven its weight s_i to the floor ε. On its own
that rule pruned little in our runs (README, "Rank selection"): with n outer iterations Frank-Wolfe
takes n small steps, and a component leaves only after a drop step. ``target_rank`` turns the budget
into the number of components a user wants at the end, R* = target_rank × (number of adapters), and
lowers the number of live components along

    k(n) = R*  + (R0 − R*) · (1 − p(n))³,    p(n) = clip((n − n_start) / (n_end − n_start), 0, 1),

n_start = ``prune_start`` · N and n_end = ``prune_end`` · N (N outer iterations), from R0 (all
components) to R*. At each truncation point the components beyond k(n) with the smallest s are moved
to the floor and removed, those already at the floor first. Which components survive is decided by
s, i.e. by the Frank-Wolfe iterates on the hypergradient; how many survive is decided by the user.
A component that Frank-Wolfe put at the floor stays available (a later FW step can grow it again)
until the schedule needs its room: with a count budget, the paper's rule "remove what is at ε"
would overshoot it (on the tiny test model, drop steps emptied most layers within a few iterations). With oblique/Stiefel bases s_i is the magnitude of component i
(‖u_i v_iᵀ‖ = 1), so this keeps the components that Frank-Wolfe made largest.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def scheduled_count(iteration: int, total_iterations: int, start_rank: int, target: int,
                    prune_start: float, prune_end: float) -> int:
    """k(n) of the module doc: the most live components allowed after outer iteration ``iteration``."""
    if target >= start_rank:
        return start_rank
    n_start = prune_start * total_iterations
    n_end = max(prune_end * total_iterations, n_start + 1e-9)
    p = min(1.0, max(0.0, (iteration - n_start) / (n_end - n_start)))
    return int(target + math.ceil((start_rank - target) * (1.0 - p) ** 3))


def smallest_beyond(s: torch.Tensor, alive: torch.Tensor, keep: int, protected: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Boolean mask of the live coordinates (``alive``) to move to the floor so that at most ``keep``
    stay alive: the smallest ``s`` first, never a ``protected`` one (a block's last component).

    Ties (many components sit exactly at the floor ε after drop steps) are broken in a random order
    drawn from ``generator``, not by position: by position, the first layers lost their components
    first."""
    out = torch.zeros_like(alive)
    excess = int(alive.sum()) - keep
    if excess <= 0:
        return out
    key = torch.where(alive & ~protected, s, torch.full_like(s, float("inf")))
    shuffle = torch.randperm(key.numel(), generator=generator)
    order = shuffle[torch.argsort(key[shuffle], stable=True)]
    candidates = order[: excess]
    candidates = candidates[torch.isfinite(key[candidates])]
    out[candidates] = True
    return out
