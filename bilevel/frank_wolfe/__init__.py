"""Projection-free upper-level solvers: Frank-Wolfe variants with exact away-step bookkeeping.

    from bilevel import frank_wolfe as fw
    S = fw.FlooredSimplex(dim, tau, eps)                  # {s >= eps, sum(s) <= tau + dim*eps}
    S = fw.ProductSet([fw.FlooredSimplex(r, tau, eps) for r in ranks])   # per-layer budgets
    v = S.lmo(grad)                                       # argmin over vertices of <grad, v>
    opt = fw.AwayStepFW(S, step=fw.ShortStep(lipschitz=M), gap_tol=p_tilde)
    state = opt.init(s0)
    s, state, info = opt.step(grad, state)                # info.gap, info.kind
    state = opt.remove_coordinates(state, torch.nonzero(opt.at_floor(state)).flatten())
    avg = fw.GradientAveraging(rho="mokhtari")            # stochastic FW: d_n = (1-rho_n) d_n-1 + rho_n g_n

Modules: ``sets`` (feasible sets, LMO, projection), ``steps`` (step-size rules), ``solvers``
(VanillaFW, AwayStepFW, PairwiseFW), ``state`` (FWState, FWInfo, KINDS), ``averaging``
(GradientAveraging: averaged stochastic gradients for the LMO).
"""
from .averaging import AveragingState, GradientAveraging
from .sets import Box, FeasibleSet, FlooredSimplex, L1Ball, ProbabilitySimplex, ProductSet
from .solvers import AwayStepFW, PairwiseFW, VanillaFW
from .state import KINDS, FWInfo, FWState
from .steps import Armijo, Constant, OpenLoop, ShortStep, StepContext, StepRule

__all__ = ["FeasibleSet", "FlooredSimplex", "ProbabilitySimplex", "L1Ball", "Box", "ProductSet",
           "VanillaFW", "AwayStepFW", "PairwiseFW", "FWState", "FWInfo", "KINDS",
           "StepRule", "StepContext", "ShortStep", "Armijo", "OpenLoop", "Constant",
           "GradientAveraging", "AveragingState"]
