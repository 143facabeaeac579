"""Lower-level solving with functional (torchopt) optimizers and explicit, warm-startable state.

    solver = bilevel.LowerSolver(problem, optimizer="adamw", lr=1e-3, weight_decay=1e-3)
    state = solver.init(y)
    y, state, info = solver.run(x, y, batches, state, steps=T_max)   # warm start: pass state back

``info.losses`` is a 1-D tensor of the lower losses (kept on device: no host sync per step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torchopt
from torch.func import grad_and_value

from . import pytree as pt
from .estimators.base import draw
from .estimators.unrolled import make_optimizer
from .problem import BilevelProblem
from .pytree import Tree


@dataclass
class LowerInfo:
    steps: int
    losses: torch.Tensor


class LowerSolver:
    def __init__(self, problem: BilevelProblem, optimizer: str = "sgd", lr: float = 0.1, **optimizer_kwargs):
        self.problem = problem
        self.optimizer_name = optimizer
        self._opt = make_optimizer(optimizer, lr, **optimizer_kwargs)

    def init(self, y: Tree):
        return self._opt.init(pt.detach(y))

    def run(self, x: Tree, y: Tree, batches: Any, state: Optional[Any] = None, steps: int = 1):
        """``steps`` optimizer steps on ``g(x, ·, batch)``; ``batches`` is a batch or an iterator."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps!r}")
        x = pt.detach(x)
        y = pt.detach(y)
        if state is None:
            state = self.init(y)
        gv = grad_and_value(self.problem.g, argnums=1)
        losses = []
        for _ in range(steps):
            gy, value = gv(x, y, draw(batches))
            updates, state = self._opt.update(gy, state, params=y, inplace=False)
            y = torchopt.apply_updates(y, updates, inplace=False)
            losses.append(value.detach())
        ref = next(iter(y.values()))
        return y, state, LowerInfo(steps, torch.stack(losses) if losses else ref.new_zeros(0))
