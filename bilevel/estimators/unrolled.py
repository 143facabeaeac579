"""Unrolled (iterative / automatic) differentiation through ``k`` lower-level optimizer steps.

Starting from ``y_0 = y`` (treated as independent of x), run ``y_{t+1} = y_t + u(∂_y g(x, y_t), state_t)``
with a differentiable torchopt optimizer and return ``d f(x, y_k) / dx`` by reverse mode through all
steps. With SGD (step η) started at y*(x) this equals the k-term Neumann estimator; in general its
error decays like the inner contraction ``(1 − ημ)^k``. Reverse mode through k steps costs k
Hessian-vector and k mixed products and keeps all k steps' graphs in memory.

Adam/AdamW caveat: at (or very near) a stationary point the linearisation of an Adam step is an SGD
step of size ``lr / (√eps_root + eps)`` (the first moment is linear in the gradient, the second is
quadratic), so unrolling Adam from y ≈ y*(x) explodes unless ``eps_root`` (torchopt's term inside the
square root) is of the order of the squared gradient scale; pass e.g. ``eps_root=1e-4``. SGD is the
safe choice for hypergradients.

``damping=λ`` adds the proximal term ``λ(y_t − y_0)`` to every inner gradient (unrolling
``g + λ/2‖y − y_0‖²``), so that the unrolled map linearises to ``I − η(∂²_yy g + λI)``: the same
Tikhonov λ as the implicit estimators' ``(∂²_yy g + λI) v = ∂_y f``.
"""
from __future__ import annotations

from typing import Any

import torch
import torchopt

from .. import _checks as _c
from ..problem import BilevelProblem, math_attention
from ..pytree import Tree
from .base import Estimator, EstimatorInfo, check_damping, draw

OPTIMIZERS = {"sgd": torchopt.sgd, "adam": torchopt.adam, "adamw": torchopt.adamw}


def make_optimizer(name: str, lr: float, **kwargs):
    """A torchopt functional optimizer (``init``/``update``) by name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of {sorted(OPTIMIZERS)}")
    lr = _c.number("lr", lr, positive=True)
    for k, v in kwargs.items():
        if isinstance(v, float):
            _c.number(k, v)
    return OPTIMIZERS[name](lr, **kwargs)


class Unrolled(Estimator):
    name = "unrolled"
    options = ("steps", "lr", "optimizer", "damping", "<torchopt optimizer keywords>")

    def __init__(self, steps: int = 20, lr: float = 0.1, optimizer: str = "sgd", damping: float = 0.0,
                 **optimizer_kwargs):
        self.steps = _c.integer("steps", steps, 1)
        self.lr, self.optimizer, self.optimizer_kwargs = lr, optimizer, optimizer_kwargs
        self.damping = check_damping(damping)
        self._opt = make_optimizer(optimizer, lr, **optimizer_kwargs)

    def estimate(self, problem: BilevelProblem, x: Tree, y: Tree, upper_batch: Any, lower_batch: Any):
        keys = list(y)
        with torch.enable_grad(), math_attention():   # differentiates through gradient steps
            x_req = {k: v.detach().requires_grad_(True) for k, v in x.items()}
            y_t = {k: v.detach().requires_grad_(True) for k, v in y.items()}
            state = self._opt.init(y_t)
            y_0 = {k: v.detach() for k, v in y.items()}
            lam = self.damping
            fixed_batch = None if hasattr(lower_batch, "__next__") else lower_batch
            for _ in range(self.steps):
                batch = fixed_batch if fixed_batch is not None else draw(lower_batch)
                gy = torch.autograd.grad(problem.g(x_req, y_t, batch), [y_t[k] for k in keys],
                                         create_graph=True)
                gy = dict(zip(keys, gy))
                if lam > 0:
                    gy = {k: gy[k] + lam * (y_t[k] - y_0[k]) for k in keys}
                updates, state = self._opt.update(gy, state, params=y_t, inplace=False)
                y_t = torchopt.apply_updates(y_t, updates, inplace=False)
            value = problem.f(x_req, y_t, upper_batch)
            grads = torch.autograd.grad(value, [x_req[k] for k in x], allow_unused=True)
        grad = {k: (g_ if g_ is not None else torch.zeros_like(x[k])).detach() for k, g_ in zip(x, grads)}
        return grad, EstimatorInfo(iterations=self.steps, hvp_count=self.steps, mixed_count=self.steps,
                                   upper_value=value.detach(),
                                   extra={"y_final": {k: v.detach() for k, v in y_t.items()},
                                          **({"damping": lam} if lam > 0 else {})})
