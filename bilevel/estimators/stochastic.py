"""Stochastic Neumann estimators with independent lower-level mini-batches.

Both approximate ``v = [∂²_yy g]⁻¹ ∂_y f`` by the truncated series ``η Σ_{k<N} (I − ηH)^k ∂_y f`` with each
Hessian factor ``H_{ξ_j}`` evaluated on its own mini-batch ξ_j drawn from ``lower_batch`` (an iterator):

* ``mode="ghadimi-wang"`` (Ghadimi & Wang 2018, BSA): draw ``K ~ Uniform{0, …, N−1}`` and return
  ``v̂ = η N ∏_{j=1}^{K} (I − η H_{ξ_j}) ∂_y f``. Unbiased for the N-term series; K products on average
  (N−1)/2.
* ``mode="stocbio"`` (Ji et al. 2021): the N-term recurrence with a fresh batch per product, N−1 products.

The mixed product ``∂²_xy g · v̂`` uses one further independent batch.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import pytree as pt
from ..problem import BilevelProblem
from ..pytree import Tree
from .base import Estimator, EstimatorInfo, HvpModeOption, draw

MODES = ("ghadimi-wang", "stocbio")


class StochasticNeumann(HvpModeOption, Estimator):
    name = "stochastic-neumann"

    def __init__(self, eta: float = 0.1, terms: int = 20, mode: str = "ghadimi-wang",
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 hvp_mode: str = "auto"):
        if eta <= 0:
            raise ValueError(f"eta must be > 0 (and ≤ 1/λ_max of the lower Hessian), got {eta!r}")
        if terms < 1:
            raise ValueError(f"terms must be >= 1, got {terms!r}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.eta, self.terms, self.mode, self.hvp_mode = eta, terms, mode, hvp_mode
        if generator is None:
            # Without a seed, draw one from the global RNG: reproducible under torch.manual_seed, and
            # (unlike torch.seed()) it does not re-seed the caller's global generator.
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self._gen = generator

    def estimate(self, problem: BilevelProblem, x: Tree, y: Tree, upper_batch: Any, lower_batch: Any):
        gx, gy, value = problem.upper_grads(x, y, upper_batch)
        hvps = 0
        if self.mode == "ghadimi-wang":
            K = int(torch.randint(0, self.terms, (1,), generator=self._gen))  # CPU generator: no device sync
            p = gy
            for _ in range(K):
                p = pt.axpy(-self.eta, problem.operators(x, y, draw(lower_batch), self.hvp_mode).hvp(p), p)
                hvps += 1
            v = pt.scale(self.eta * self.terms, p)
            extra = {"K": K}
        else:
            p, acc = gy, gy
            for _ in range(self.terms - 1):
                p = pt.axpy(-self.eta, problem.operators(x, y, draw(lower_batch), self.hvp_mode).hvp(p), p)
                acc = pt.add(acc, p)
                hvps += 1
            v = pt.scale(self.eta, acc)
            extra = {}
        mixed = problem.operators(x, y, draw(lower_batch), self.hvp_mode).mixed(v)
        grad = {k: gx[k] - mixed[k] for k in gx}
        return grad, EstimatorInfo(hvp_count=hvps, mixed_count=1, iterations=hvps, upper_value=value,
                                   extra=extra)
