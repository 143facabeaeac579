"""Verdict criteria, fixed in code before any number was looked at (do not tune them to pass).

Every verdict is one of ``holds`` / ``fails`` / ``inconclusive``; each result row carries the text
of the criterion that produced it.
"""
from __future__ import annotations

import math

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"

# Reference hypergradient: converged CG vs dense solve, dense vs finite differences (toy).
REF_CG_VS_EXACT = 1e-6           # relative difference
REF_FD_VS_EXACT = 1e-4           # relative difference (central differences, h = 1e-5, float64)

# Theorem 4.1 bound ‖G − ∇F‖ ≲ Kβ: the "≲" is read as "within a factor 10".
THM41_BOUND_FACTOR = 10.0
# Accuracy of an estimator against the reference.
ACC_COS_HOLDS, ACC_REL_HOLDS = 0.9, 0.5      # holds: cosine ≥ 0.9 and relative error ≤ 0.5
ACC_COS_FAILS, ACC_REL_FAILS = 0.5, 1.0      # fails: cosine < 0.5 or relative error > 1

# Assumption 6.1 / Theorem 6.2: η < 1/3 must be admissible, i.e. χ ≤ η p̃ / (2 + 2η) for some
# η < 1/3  ⟺  χ < p̃ / 8. p̃ (the FW gap tolerance) is fixed relative to the true initial gap.
P_TILDE_REL = 0.05               # p̃ = 5 % of the reference FW gap at s0
ETA_MAX = 1.0 / 3.0

# Lipschitz constant M: the FD Hessian norm at h and h/10 must agree within this factor.
M_FD_AGREEMENT = 0.1

# Theorem 6.2: claimed slope ≤ −1/2 of log min-gap vs log T.
THM62_SLOPE = -0.5

# Theorem 6.5: the support must be unchanged over at least the last fraction of the run.
THM65_STABLE_FRACTION = 0.25


# Envelope theorem (D1 = D2, first-order at an exact lower solution is the hypergradient): cosine and
# relative error against the reference ∇F, conclusive only at a lower level converged to this
# Riemannian gradient norm (the identity is exact only at ∂_B g = 0).
ENVELOPE_COS, ENVELOPE_REL = 0.9999, 1e-3
ENVELOPE_LOWER_TOL = 1e-5

# Count-budget run: the top-k set of s must be fixed with at least this fraction of the pruning window
# [n_start, n_end] to spare (s chose the survivors before the schedule forced the count).
TOPK_WINDOW_SPARE = 0.25


# The default's SVD cut (checks/cut.py): its key σ²/parameter against the exact cost of removing each
# component alone (per parameter): Spearman ρ, and the loss increase of the cut it makes against the same
# cut ranked by the exact costs.
CUT_RHO_HOLDS, CUT_RHO_FAILS = 0.7, 0.3
CUT_LOSS_HOLDS, CUT_LOSS_FAILS = 1.5, 3.0


def accuracy_verdict(cos: float, rel: float) -> str:
    if not (math.isfinite(cos) and math.isfinite(rel)):
        return INCONCLUSIVE
    if cos >= ACC_COS_HOLDS and rel <= ACC_REL_HOLDS:
        return HOLDS
    if cos < ACC_COS_FAILS or rel > ACC_REL_FAILS:
        return FAILS
    return INCONCLUSIVE


ACCURACY_TEXT = (f"holds if cos ≥ {ACC_COS_HOLDS} and rel.err ≤ {ACC_REL_HOLDS}; fails if cos < "
                 f"{ACC_COS_FAILS} or rel.err > {ACC_REL_FAILS}; else inconclusive")


def bound_verdict(err: float, K: float, beta: float) -> str:
    if not (math.isfinite(K) and math.isfinite(beta)) or not math.isfinite(err):
        return INCONCLUSIVE
    return HOLDS if err <= THM41_BOUND_FACTOR * K * beta else FAILS


BOUND_TEXT = (f"holds if ‖G − ∇F‖ ≤ {THM41_BOUND_FACTOR:g}·K·β; inconclusive if β = ∞ (the operator "
              "∂_Ψ L2·∂²_B Ψ is singular: the bound is vacuous)")


def slope_verdict(ci_low: float, ci_high: float) -> str:
    if ci_high <= THM62_SLOPE:
        return HOLDS
    if ci_low > THM62_SLOPE:
        return FAILS
    return INCONCLUSIVE


SLOPE_TEXT = (f"holds if the 95% CI of the log-log slope of min_{{n<T}} gap_n lies at or below "
              f"{THM62_SLOPE}; fails if it lies entirely above; else inconclusive")
