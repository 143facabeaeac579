"""Stochastic Neumann estimators with independent lower-level mini-batches.

Both approximate ``v = [∂²_yy g]⁻¹ ∂_y f`` by the truncated series ``η Σ_{k<N} (I − ηH)^k ∂_y f`` with each
Hessian factor ``H_{ξ_j}`` evaluated on its own mini-batch ξ_j drawn from ``lower_batch`` (an iterator):

* ``mode="ghadimi-wang"`` (Ghadimi & Wang 2018, BSA): draw ``K ~ Uniform{0, …, N−1}`` and return
  ``v̂ = η N ∏_{j=1}^{K} (I − η H_{ξ_j}) ∂_y f``. Unbiased for the N-term series; K products on average
  (N−1)/2.
* ``mode="stocbio"`` (Ji et al. 2021): the N-term recurrence with a fresh batch per product, N−1 products.

The mixed product ``∂²_xy g · v̂`` uses one further independent batch. ``damping=λ`` replaces each
``H_ξ`` by ``H_ξ + λI`` (as in every implicit estimator). The random truncation level K comes from a CPU
generator whose state is the estimator's explicit state (``EstimatorState.rng``).

A single lower batch (not an iterator) makes every product reuse it: a ``UserWarning`` says so.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from .. import _checks as _c
from .. import pytree as pt
from ..problem import BilevelProblem, no_autocast
from ..pytree import Tree
from .base import (Estimator, EstimatorInfo, EstimatorState, HvpModeOption, check_damping, check_eta,
                   draw, is_batch_iterator)

MODES = ("ghadimi-wang", "stocbio")


class StochasticNeumann(HvpModeOption, Estimator):
    name = "stochastic-neumann"
    options = ("eta", "terms", "mode", "generator", "seed", "hvp_mode", "damping")

    def __init__(self, eta: float = 0.1, terms: int = 20, mode: str = "ghadimi-wang",
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 hvp_mode: str = "auto", damping: float = 0.0):
        self.eta, self.terms = check_eta(eta), _c.integer("terms", terms, 1)
        self.mode, self.hvp_mode = _c.choice("mode", mode, MODES), hvp_mode
        self.damping = check_damping(damping)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            _c.integer("seed", seed, 0)
        if generator is None:
            # Without a seed, draw one from the global RNG: reproducible under torch.manual_seed, and
            # (unlike torch.seed()) it does not re-seed the caller's global generator.
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self._rng0 = generator.get_state()

    def init(self, x: Tree, y: Tree) -> EstimatorState:
        return EstimatorState(rng=self._rng0.clone())

    def estimate_with_state(self, problem: BilevelProblem, x: Tree, y: Tree, upper_batch: Any,
                            lower_batch: Any, state: EstimatorState):
        if not is_batch_iterator(lower_batch):
            warnings.warn("stochastic-neumann got a single lower batch, so every Hessian product reuses "
                          "it (the products are not independent draws); pass an iterator of batches, "
                          "e.g. bilevel.BatchStream(batches), or use the deterministic 'neumann'",
                          UserWarning, stacklevel=3)
        gen = torch.Generator()
        gen.set_state(state.rng if state.rng is not None else self._rng0)
        gx, gy, value = problem.upper_grads(x, y, upper_batch)
        eta, lam = self.eta, self.damping
        hvps = 0

        def step(p):
            hp = problem.operators(x, y, draw(lower_batch), self.hvp_mode).hvp(p)
            if lam > 0:
                hp = pt.axpy(lam, p, hp)
            return pt.axpy(-eta, hp, p)

        with no_autocast():
            if self.mode == "ghadimi-wang":
                K = int(torch.randint(0, self.terms, (1,), generator=gen))  # CPU generator: no device sync
                p = gy
                for _ in range(K):
                    p = step(p)
                    hvps += 1
                v = pt.scale(self.eta * self.terms, p)
                extra = {"K": K}
            else:
                p, acc = gy, gy
                for _ in range(self.terms - 1):
                    p = step(p)
                    acc = pt.add(acc, p)
                    hvps += 1
                v = pt.scale(self.eta, acc)
                extra = {}
            mixed = problem.operators(x, y, draw(lower_batch), self.hvp_mode).mixed(v)
        grad = {k: gx[k] - mixed[k] for k in gx}
        if lam > 0:
            extra["damping"] = lam
        info = EstimatorInfo(hvp_count=hvps, mixed_count=1, iterations=hvps, upper_value=value,
                             extra=extra)
        return grad, info, EstimatorState(step=state.step + 1, warm=state.warm, rng=gen.get_state(),
                                          iterations=hvps)
