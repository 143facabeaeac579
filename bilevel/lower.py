"""Lower-level solving with functional (torchopt) optimizers and explicit, warm-startable state.

    solver = bilevel.LowerSolver(problem, optimizer="adamw", lr=1e-3, weight_decay=1e-3)
    state = solver.init(y)
    y, state, info = solver.run(x, y, batches, state, steps=T_max)   # warm start: pass y, state back

Each step is ``y_{t+1} = y_t + u_t`` with ``(u_t, state) = optimizer.update(∂_y g(x, y_t, ξ_t), state)``
(paper: T_max steps on D2 batches ξ_t between two outer iterations). ``info.losses`` is a 1-D tensor
of the lower losses ``g(x, y_t, ξ_t)``, kept on the device: no host sync per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torchopt

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
    """``steps`` steps of a torchopt functional optimizer (``sgd``, ``adam``, ``adamw``) on ``g(x, ·)``.

    Args:
        problem: the bilevel problem (its lower loss g is minimised).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: step size; further keywords go to the torchopt constructor (``momentum``,
            ``weight_decay``, ``betas``, ...).
    """

    def __init__(self, problem: BilevelProblem, optimizer: str = "sgd", lr: float = 0.1, **optimizer_kwargs):
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        self.problem = problem
        self.optimizer_name = optimizer
        self._opt = make_optimizer(optimizer, lr, **optimizer_kwargs)
        self._signature = None

    def init(self, y: Tree):
        """A fresh optimizer state for ``y`` (remembers y's structure to check later warm starts)."""
        pt.check_tree(y, "y")
        self._signature = pt.signature(y)
        return self._opt.init(pt.detach(y))

    def _check_state(self, y: Tree) -> None:
        if self._signature is not None and pt.signature(y) != self._signature:
            raise ValueError("y does not match the optimizer state (its keys, shapes or dtypes differ "
                             "from the y given to init, e.g. after a truncation); call "
                             "solver.init(y) for a fresh state, or shrink the state like y")

    def run(self, x: Tree, y: Tree, batches: Any, state: Optional[Any] = None, steps: int = 1):
        """``steps`` optimizer steps on ``g(x, ·, ξ_t)``; ``batches`` is one batch or an iterator.

        Returns ``(y, state, LowerInfo)``; pass ``y`` and ``state`` back in to continue (warm start)."""
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        pt.check_tree(x, "x")
        pt.check_tree(y, "y")
        x = pt.detach(x)
        y = pt.detach(y)
        if state is None:
            state = self.init(y)
        else:
            self._check_state(y)
        losses = []
        for _ in range(steps):
            gy, value = self.problem.lower_value_and_grad_y(x, y, draw(batches))
            updates, state = self._opt.update(gy, state, params=y, inplace=False)
            y = torchopt.apply_updates(y, updates, inplace=False)
            losses.append(value.detach())
        ref = next(iter(y.values()))
        return y, state, LowerInfo(steps, torch.stack(losses) if losses else ref.new_zeros(0))
