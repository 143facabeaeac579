"""The rank budget as a count the user sets: ``target_rank`` with a cubic schedule (like AdaLoRA's).

The paper removes a component once Frank-Wolfe has driven its weight s_i to the floor ε. On its own
that rule pruned little in our runs (docs/rank_selection.md): with n outer iterations Frank-Wolfe
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

``target_params`` sets the budget in adapter parameters instead (P*: every adapter's s and basis
columns; the head is not counted). Component i of a layer costs c_i parameters (``s_i`` and one column
of each basis: d_in + d_out + 1 for a matrix, the four mode sizes + 1 for a CP conv adapter), the
schedule lowers P(n) = P* + (P0 − P*)(1 − p(n))³ from P0 = Σ_l r0 c_l, and each truncation point
removes components in the same order until the live ones cost at most P(n): the final adapter lands
on P*, at most one component's cost below it.

Which layers lose components (``prune_allocation``, for ``prune_by="s"``): ``global`` takes the
smallest s over all layers (the order above); ``uniform`` takes the highest-ranked layers' smallest-s
components first, so every layer ends at the same rank and s chooses only *which* components a layer
keeps; ``s2_per_param`` takes the smallest s_i²/c_i first (magnitude² kept per parameter, as
``svd_allocation="sigma2_per_param"`` does for singular values).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


SCHEDULE_POWERS = {"cubic": 3, "linear": 1}


def scheduled_count(iteration: int, total_iterations: int, start_rank: int, target: int,
                    prune_start: float, prune_end: float, shape: str = "cubic") -> int:
    """k(n) of the module doc: the most live components allowed after outer iteration ``iteration``;
    ``shape="linear"`` lowers it along (1 − p(n)) instead of (1 − p(n))³ (the same window, the removals
    later in it)."""
    if shape not in SCHEDULE_POWERS:
        raise ValueError(f"shape={shape!r} is not one of {sorted(SCHEDULE_POWERS)}")
    if target >= start_rank:
        return start_rank
    n_start = prune_start * total_iterations
    n_end = max(prune_end * total_iterations, n_start + 1e-9)
    p = min(1.0, max(0.0, (iteration - n_start) / (n_end - n_start)))
    return int(target + math.ceil((start_rank - target) * (1.0 - p) ** SCHEDULE_POWERS[shape]))


def smallest_beyond(s: torch.Tensor, alive: torch.Tensor, keep: int, protected: torch.Tensor,
                    generator: Optional[torch.Generator] = None,
                    cost: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of the live coordinates (``alive``) to move to the floor so that at most ``keep``
    stay alive: the smallest ``s`` first, never a ``protected`` one (a block's last component).
    With ``cost`` (parameters per coordinate), ``keep`` is a parameter budget: the shortest prefix of
    that order whose removal brings the live cost to ``keep`` or below (fewer if protected components
    are all that is left).

    Ties (many components sit exactly at the floor ε after drop steps) are broken in a random order
    drawn from ``generator``, not by position: by position, the first layers lost their components
    first."""
    out = torch.zeros_like(alive)
    weights = torch.ones_like(s, dtype=torch.float64) if cost is None else cost.to(torch.float64)
    excess = float(weights[alive].sum()) - keep
    if excess <= 0:
        return out
    key = torch.where(alive & ~protected, s, torch.full_like(s, float("inf")))
    shuffle = torch.randperm(key.numel(), generator=generator)
    order = shuffle[torch.argsort(key[shuffle], stable=True)]
    order = order[torch.isfinite(key[order])]
    removed_cost = torch.cumsum(weights[order], 0)
    count = int(torch.searchsorted(removed_cost, torch.tensor(excess, dtype=torch.float64))) + 1
    out[order[:count]] = True
    return out


def allocation_key(s: torch.Tensor, blocks, allocation: str,
                   cost: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The order in which ``smallest_beyond`` removes components (smallest key first), for
    ``prune_allocation`` (module doc): ``global`` → s; ``uniform`` → −(position of s_i in its block,
    0 = largest) + s_i/(1 + s_i), so the blocks with the most live components lose their smallest
    first and ties between blocks of equal rank go by s; ``s2_per_param`` → s_i²/c_i. ``blocks``:
    one slice per layer."""
    if allocation == "global":
        return s
    if allocation == "s2_per_param":
        if cost is None:
            raise ValueError("prune_allocation='s2_per_param' needs each component's cost")
        return s ** 2 / cost.to(s.dtype)
    if allocation != "uniform":
        raise ValueError(f"prune_allocation={allocation!r} is not one of ['global', 'uniform', 's2_per_param']")
    key = torch.empty_like(s)
    for sl in blocks:
        block = s[sl]
        if block.numel():
            position = torch.argsort(torch.argsort(block, descending=True, stable=True), stable=True)
            key[sl] = -position.to(s.dtype) + block / (1.0 + block)
    return key
