"""Averaged gradients for stochastic Frank-Wolfe (explicit state, optax style).

A stochastic Frank-Wolfe step picks its vertex by ``argmin_v <g_n, v>``; with a noisy ``g_n`` the
vertex follows the noise and the iterate wanders, whatever the step size. Mokhtari, Hassani and
Karbasi (JMLR 2020, "Stochastic conditional gradient methods") hand the solver a running average
instead::

    d_1 = g_1,        d_n = (1 - rho_n) d_{n-1} + rho_n g_n

With ``rho_n = 4 / (n + 8)^(2/3)`` (``rho="mokhtari"``, their convex-case schedule) the variance of
``d_n - grad F(x_n)`` goes to 0 and stochastic FW converges with one sample per step; a constant
``rho`` is an exponential moving average over about ``1/rho`` steps (``rho=1``: no averaging, d = g).
Use it in front of any solver::

    avg = GradientAveraging(rho=0.1)
    a_state = avg.init()
    d, a_state = avg.update(g, a_state)
    s, fw_state, info = opt.step(d, fw_state)          # info.gap is the gap of d, not of g
    a_state = avg.remove_coordinates(a_state, idx)     # with opt.remove_coordinates(fw_state, idx)

The state is immutable (a new one per update), like :class:`FWState`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._checks import check_real

__all__ = ["GradientAveraging", "AveragingState"]


@dataclass(frozen=True)
class AveragingState:
    """``d``: the running average (None before the first gradient); ``n``: gradients seen."""

    d: Optional[torch.Tensor] = None
    n: int = 0


class GradientAveraging:
    """d_n = (1 − ρ_n) d_{n−1} + ρ_n g_n with d_1 = g_1.

    rho -- a constant in (0, 1] (an exponential moving average; 1 = d is g), or ``"mokhtari"`` for
           ρ_n = min(1, 4 / (n + 8)^(2/3)) (n = 1, 2, ...), the schedule of Mokhtari et al. (2020).
    """

    def __init__(self, rho: Union[float, str] = "mokhtari"):
        if isinstance(rho, str):
            if rho != "mokhtari":
                raise ValueError(f"rho must be a number in (0, 1] or 'mokhtari', got {rho!r}")
        else:
            rho = check_real("rho", rho)
            if not 0.0 < rho <= 1.0:
                raise ValueError(f"rho must be in (0, 1] (1 = no averaging), got {rho!r}")
        self.rho = rho

    def __repr__(self):
        return f"GradientAveraging(rho={self.rho!r})"

    def rate(self, n: int) -> float:
        """ρ_n for the n-th gradient (n >= 1); ρ_1 is always 1 (d_1 = g_1)."""
        if n <= 1:
            return 1.0
        if self.rho == "mokhtari":
            return min(1.0, 4.0 / (n + 8) ** (2.0 / 3.0))
        return float(self.rho)

    def init(self) -> AveragingState:
        return AveragingState()

    def update(self, grad: torch.Tensor, state: AveragingState):
        """``(d_n, new state)``. ``grad`` must have the shape of the previous ones (1-D, like x)."""
        n = state.n + 1
        if state.d is None:
            d = grad.clone()
        else:
            if state.d.shape != grad.shape:
                raise ValueError(f"gradient of shape {tuple(grad.shape)} after {state.n} of shape "
                                 f"{tuple(state.d.shape)}; after removing coordinates from the solver, "
                                 "remove them here too (remove_coordinates)")
            rho = self.rate(n)
            d = torch.lerp(state.d.to(grad.dtype), grad, rho)
        return d, AveragingState(d=d, n=n)

    def remove_coordinates(self, state: AveragingState, idx) -> AveragingState:
        """Drop coordinates ``idx`` (global indices, as given to the solver's ``remove_coordinates``)."""
        if state.d is None:
            return state
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
        keep = torch.ones(state.d.numel(), dtype=torch.bool)
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= state.d.numel():
                raise ValueError(f"coordinates {idx.tolist()} out of range for {state.d.numel()} coordinates")
            keep[idx] = False
        return AveragingState(d=state.d[keep.to(state.d.device)], n=state.n)
