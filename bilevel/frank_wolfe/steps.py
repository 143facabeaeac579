"""Step-size rules for Frank-Wolfe directions, each capped by the direction's gamma_max.

A rule sees one direction per *group* (a group is an atomic block when the solver is ``blockwise``,
else the whole set): the directional derivative g^T d, ||d||^2 and gamma_max, all tensors of shape
(G,).  It returns gamma of shape (G,) and its new state.  The solver then clips gamma to
[0, gamma_max] and sets it to 0 where g^T d >= 0 (no descent predicted by the gradient passed in) or
when the FW gap is <= p_tilde.

* ``ShortStep(lipschitz=M)``: gamma = min(gamma_max, -g^T d / (M ||d||^2)), the minimiser of the
  quadratic upper bound g^T d gamma + M/2 gamma^2 ||d||^2 (Lacoste-Julien & Jaggi 2015; the paper's
  conditions (8)-(10)).  With ``lipschitz=None`` M is estimated on the fly: with an objective
  (constructor or ``step(..., objective=f)``) by the adaptive backtracking of Pedregosa et al. (2020):
  M <- decrease*M, then M <- increase*M until f(x + gamma d) <= f(x) + gamma g^T d + M/2 gamma^2 ||d||^2;
  without one by the secant estimate M_n = max(decrease*M_{n-1}, ||g_n - g_{n-1}|| / ||x_n - x_{n-1}||)
  (a heuristic: exact for the curvature seen along the last step, never above the true L for exact
  gradients; with noisy gradients it overestimates M, i.e. it takes smaller, safer steps).  Until the
  first estimate exists the step is gamma_max.
* ``Armijo(objective)``: backtracking gamma = t * gamma_max, t = 1, beta, beta^2, ... until
  f(x + gamma d) <= f(x) + c * gamma * g^T d; gamma = 0 if ``max_backtracks`` all fail.
* ``OpenLoop()``: gamma_n = min(gamma_max, 2 / (n + 2)), n = number of previous steps.
* ``Constant(gamma)``: min(gamma_max, gamma).

None of them assumes that g is an exact gradient; only ``Armijo`` and the adaptive ``ShortStep`` need
function values, and they synchronise with the host to compare them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from ._checks import check_real


@dataclass
class StepContext:
    """What a rule may look at (built by the solver)."""

    x: torch.Tensor            # current iterate (dim,)
    grad: torch.Tensor         # the gradient passed to step (dim,)
    direction: torch.Tensor    # d (dim,), dense
    gd: torch.Tensor           # (G,) g^T d per group (<= 0)
    dnorm2: torch.Tensor       # (G,) ||d||^2 per group
    gamma_max: torch.Tensor    # (G,)
    group_c: Optional[torch.Tensor]   # (dim,) group of each coordinate, None for a single group
    n: int                     # number of previous steps
    objective: Optional[Callable[[torch.Tensor], torch.Tensor]]
    stationary: torch.Tensor   # 0-dim bool: gap <= p_tilde

    def trial(self, gamma: torch.Tensor) -> torch.Tensor:
        """x + gamma_group * d."""
        g = gamma if self.group_c is None else gamma[self.group_c]
        return self.x + g * self.direction


def _short(gd, dnorm2, M):
    ok = (dnorm2 > 0) & (gd < 0)
    safe = torch.where(ok, dnorm2, torch.ones_like(dnorm2))
    return torch.where(ok, -gd / (M * safe), torch.zeros_like(gd))


class StepRule:
    """Base class.  ``init(x)`` -> rule state; ``__call__(ctx, rule_state)`` -> (gamma, state, n_evals)."""

    def init(self, x: torch.Tensor) -> Any:
        return None

    def restrict(self, rule_state: Any, keep: torch.Tensor) -> Any:
        """Rule state after removing the coordinates where ``keep`` is False."""
        return rule_state

    def __call__(self, ctx: StepContext, rule_state: Any):  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class ShortStepState:
    lipschitz: torch.Tensor                 # 0-dim; 0 = no estimate yet
    prev_x: Optional[torch.Tensor] = None
    prev_grad: Optional[torch.Tensor] = None


class ShortStep(StepRule):
    """gamma = min(gamma_max, -g^T d / (M ||d||^2)); M = ``lipschitz`` (paper: M) or estimated."""

    def __init__(self, lipschitz: Optional[float] = None, *, objective: Optional[Callable] = None,
                 init_lipschitz: Optional[float] = None, increase: float = 2.0, decrease: float = 0.9,
                 max_backtracks: int = 60):
        self.lipschitz = None if lipschitz is None else check_real(
            "lipschitz", lipschitz, positive=True, hint=" (M, the Lipschitz constant of the gradient)")
        self.init_lipschitz = None if init_lipschitz is None else check_real("init_lipschitz", init_lipschitz,
                                                                             positive=True)
        self.objective = objective
        self.increase = check_real("increase", increase, positive=True)
        if self.increase <= 1:
            raise ValueError(f"increase must be > 1, got {increase!r}")
        self.decrease = check_real("decrease", decrease, positive=True)
        if self.decrease > 1:
            raise ValueError(f"decrease must be in (0, 1], got {decrease!r}")
        self.max_backtracks = int(max_backtracks)

    def __repr__(self):
        return f"ShortStep(lipschitz={self.lipschitz!r})"

    def init(self, x):
        m = self.lipschitz if self.lipschitz is not None else (self.init_lipschitz or 0.0)
        return ShortStepState(torch.tensor(m, dtype=x.dtype, device=x.device))

    def restrict(self, rule_state, keep):
        if rule_state is None or rule_state.prev_x is None:
            return rule_state
        keep = keep.to(rule_state.prev_x.device)
        return replace(rule_state, prev_x=rule_state.prev_x[keep], prev_grad=rule_state.prev_grad[keep])

    def __call__(self, ctx, rs):
        if rs is None:
            rs = self.init(ctx.x)
        if self.lipschitz is not None:
            return _short(ctx.gd, ctx.dnorm2, rs.lipschitz), rs, 0
        f = ctx.objective if ctx.objective is not None else self.objective
        if f is not None:
            return self._backtrack(ctx, rs, f)
        # secant estimate from consecutive (x, g) pairs; branch-free, no host sync
        M = rs.lipschitz
        if rs.prev_x is not None:
            dx = torch.linalg.vector_norm(ctx.x - rs.prev_x)
            dg = torch.linalg.vector_norm(ctx.grad - rs.prev_grad)
            est = torch.where(dx > 0, dg / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.zeros_like(dx))
            M = torch.maximum(self.decrease * M, est)
        gamma = torch.where(M > 0, _short(ctx.gd, ctx.dnorm2, M.clamp_min(torch.finfo(M.dtype).tiny)),
                            ctx.gamma_max)
        # keep a private copy of g: callers often reuse their gradient buffers in place
        return gamma, ShortStepState(M, ctx.x, ctx.grad.clone()), 0

    def _backtrack(self, ctx, rs, f):
        """Adaptive M (Pedregosa, Negiar, Askari & Jaggi 2020, Algorithm 2)."""
        if bool(ctx.stationary):
            return torch.zeros_like(ctx.gd), rs, 0
        M = float(rs.lipschitz)
        if M <= 0:   # first call: the M that makes the largest short step equal gamma_max
            ok = (ctx.dnorm2 > 0) & (ctx.gd < 0)
            cand = torch.where(ok, -ctx.gd / (ctx.gamma_max.clamp(max=1.0) * ctx.dnorm2.clamp_min(1e-300)),
                               torch.zeros_like(ctx.gd))
            M = float(cand.max()) or 1.0
        else:
            M = self.decrease * M
        f0 = f(ctx.x)
        evals = 1
        gamma = torch.zeros_like(ctx.gd)
        for _ in range(self.max_backtracks):
            gamma = torch.minimum(_short(ctx.gd, ctx.dnorm2, M), ctx.gamma_max)
            bound = f0 + (gamma * ctx.gd).sum() + 0.5 * M * (gamma ** 2 * ctx.dnorm2).sum()
            evals += 1
            if bool(f(ctx.trial(gamma)) <= bound):
                break
            M *= self.increase
        else:
            gamma = torch.zeros_like(ctx.gd)
        return gamma, ShortStepState(torch.tensor(M, dtype=ctx.x.dtype, device=ctx.x.device)), evals


class Armijo(StepRule):
    """Backtracking gamma = t*gamma_max with t = 1, beta, beta^2, ... (sufficient decrease, constant c).

    ``objective(x) -> scalar tensor`` is given here or per call via ``opt.step(g, state, objective=f)``
    (the per-call one wins: in stochastic use it is typically the loss on the current mini-batch).
    """

    def __init__(self, objective: Optional[Callable] = None, *, c: float = 1e-4, beta: float = 0.5,
                 max_backtracks: int = 30):
        self.objective = objective
        self.c = check_real("c", c, positive=True)
        self.beta = check_real("beta", beta, positive=True)
        if not (self.c < 1 and self.beta < 1):
            raise ValueError(f"Armijo needs 0 < c < 1 and 0 < beta < 1, got c={c!r}, beta={beta!r}")
        self.max_backtracks = int(max_backtracks)

    def __repr__(self):
        return f"Armijo(c={self.c!r}, beta={self.beta!r})"

    def __call__(self, ctx, rs):
        f = ctx.objective if ctx.objective is not None else self.objective
        if f is None:
            raise ValueError("Armijo needs an objective: pass Armijo(objective=f) or "
                             "opt.step(grad, state, objective=f) with f(x) -> scalar tensor")
        if bool(ctx.stationary):
            return torch.zeros_like(ctx.gd), rs, 0
        gmax = torch.where(torch.isfinite(ctx.gamma_max), ctx.gamma_max, torch.ones_like(ctx.gamma_max))
        f0 = f(ctx.x)
        evals = 1
        t = 1.0
        for _ in range(self.max_backtracks):
            gamma = t * gmax
            evals += 1
            if bool(f(ctx.trial(gamma)) <= f0 + self.c * (gamma * ctx.gd).sum()):
                return gamma, rs, evals
            t *= self.beta
        return torch.zeros_like(ctx.gd), rs, evals


class OpenLoop(StepRule):
    """gamma_n = min(gamma_max, 2 / (n + 2)) (Dunn & Harshbarger); n = number of previous steps."""

    def __repr__(self):
        return "OpenLoop()"

    def __call__(self, ctx, rs):
        return torch.full_like(ctx.gd, 2.0 / (ctx.n + 2)).minimum(ctx.gamma_max), rs, 0


class Constant(StepRule):
    """gamma = min(gamma_max, gamma)."""

    def __init__(self, gamma: float):
        self.gamma = check_real("gamma", gamma, positive=True)

    def __repr__(self):
        return f"Constant({self.gamma!r})"

    def __call__(self, ctx, rs):
        return torch.full_like(ctx.gd, self.gamma).minimum(ctx.gamma_max), rs, 0
