"""Explicit solver state and per-step diagnostics.

``FWState`` is immutable: ``step`` and ``remove_coordinates`` return a new one and never write into the
tensors of the old one, so a caller may keep (and resume from) any earlier state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .sets import FeasibleSet

#: step kinds; ``FWInfo.kinds`` holds these codes per block
KINDS = ("stationary", "fw", "away", "drop", "pairwise", "none")
STATIONARY, FW, AWAY, DROP, PAIRWISE, NONE = range(len(KINDS))


@dataclass(frozen=True)
class FWState:
    """State of a Frank-Wolfe solver.

    x        -- the iterate (1-D tensor, in ``set``); always equal to ``set.combine(weights)``
    set      -- the CURRENT feasible set (truncation replaces it)
    weights  -- barycentric weights over the set's atoms, layout ``[plus (dim) | minus (dim, symmetric
                sets only) | origin (one per block)]``; for FlooredSimplex(dim, tau, eps) that is
                (w_1..w_dim, w_0) with s = eps + tau*w_plus.  Each block's weights are >= 0 and sum
                to 1; the active set is ``weights > 0``.
    n        -- number of ``step`` calls so far (the open-loop rule uses it)
    rule_state -- the step-size rule's state (e.g. the running Lipschitz estimate M)
    """

    x: torch.Tensor
    set: FeasibleSet
    weights: torch.Tensor
    n: int = 0
    rule_state: Any = None

    @property
    def active(self) -> torch.Tensor:
        """Boolean mask over atoms: the active set (weight > 0)."""
        return self.weights > 0

    @property
    def active_set_size(self) -> torch.Tensor:
        return (self.weights > 0).sum()

    @property
    def lipschitz(self) -> Optional[torch.Tensor]:
        """Current Lipschitz estimate M of the step rule, if it keeps one."""
        return getattr(self.rule_state, "lipschitz", None)


@dataclass(frozen=True)
class FWInfo:
    """Diagnostics of one step.  Tensors stay on the iterate's device (no host sync until read).

    gap        -- FW gap  -g^T (z - x) summed over blocks (0-dim tensor; the stationarity certificate,
                  computed from the gradient passed in, clamped at >= 0 against rounding)
    away_gap   -- -g^T (x - y) summed over blocks, y the away vertex (None for VanillaFW)
    block_gaps -- (B,) FW gap of each atomic block
    kinds      -- (B,) int8 codes into ``KINDS`` per block
    step_size  -- (B,) step size gamma taken in each block (0 where nothing moved)
    gamma_max  -- (B,) maximal step of the chosen direction (1 for FW, lambda/(1-lambda) for away,
                  lambda for pairwise)
    stationary -- 0-dim bool tensor, True when gap <= p_tilde (gap_tol): x was left unchanged
    n_evals    -- objective evaluations spent by the step rule (Armijo / backtracking)
    lipschitz  -- the Lipschitz estimate M used (0-dim tensor) or None
    active_set_size -- (property) 0-dim tensor, number of atoms with positive weight after the step
    """

    gap: torch.Tensor
    away_gap: Optional[torch.Tensor]
    block_gaps: torch.Tensor
    kinds: torch.Tensor
    step_size: torch.Tensor
    gamma_max: torch.Tensor
    stationary: torch.Tensor
    n_evals: int = 0
    lipschitz: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = field(default=None, repr=False)   # the new barycentric weights

    @property
    def active_set_size(self) -> torch.Tensor:
        """Number of atoms with positive weight after the step (0-dim tensor, computed on access)."""
        return (self.weights > 0).sum()

    @property
    def kind(self) -> str:
        """One of KINDS if every block took the same kind of step, else "mixed" (host sync)."""
        codes = set(self.kinds.tolist())
        if len(codes) == 1:
            return KINDS[codes.pop()]
        return "mixed"

    @property
    def kind_counts(self) -> Dict[str, int]:
        """Number of blocks per step kind (host sync)."""
        counts = torch.bincount(self.kinds.long(), minlength=len(KINDS)).tolist()
        return {k: c for k, c in zip(KINDS, counts) if c}
