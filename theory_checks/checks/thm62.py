"""Check 4 — Theorem 6.2: min_{n<T} gap_n against T (true FW gap with the reference ∇F, taken over the
reference checkpoints n < T — an upper bound on the min over all n < T), the fitted
log-log slope with a 95% CI, and the bound sqrt(2Δ²M(F(s0) − F*)/(Tρ(1−η)²)) with measured Δ, M, η
(ρ = 1: the short step's sufficient decrease −g·d/(2M‖d‖²)·… gives the theorem's constant with ρ = 1)."""
from __future__ import annotations

import math

import numpy as np

from .. import constants as C
from .. import criteria as CR
from ..study import Study, fmt, row

NAME = "Thm 6.2"
RHO = 1.0


def run(st: Study):
    ap = st.ap
    pts = st.run_record["ref_points"]
    ns = np.array([p["n"] for p in pts])
    gaps = np.array([p["gap"] for p in pts])
    Fs = np.array([p["F"] for p in pts])
    T = ns + 1
    min_gap = np.minimum.accumulate(gaps)
    # fit on T ≥ 2 (the first point carries no rate information) while the min-gap is positive
    # (an exactly stationary iterate, min-gap ≤ 1e-12·gap0, satisfies every rate from then on)
    zero = min_gap <= 1e-12 * max(gaps[0], 1e-300)
    T_zero = int(T[zero][0]) if zero.any() else None
    mask = (T >= 2) & ~zero
    Tm, gm = T[mask], min_gap[mask]
    if len(Tm) > 25:
        idx = np.unique(np.round(np.geomspace(1, len(Tm), 25)).astype(int) - 1)
        Tm, gm = Tm[idx], gm[idx]
    fit = None
    if len(Tm) >= 3 and np.all(gm > 0):
        fit = C.loglog_slope(Tm, gm)
    Delta = C.diameter_floored_simplex(ap.r_total, ap.tau)
    F0, Fstar = Fs[0], Fs.min()
    chi, p = st.chi, st.p_tilde
    eta = 2 * chi / (p - 2 * chi) if p > 2 * chi else math.inf
    premise = eta < CR.ETA_MAX
    eta_b = eta if premise else 0.0
    bound = np.sqrt(2 * Delta ** 2 * st.M * max(F0 - Fstar, 0.0) / (T * RHO * (1 - eta_b) ** 2))
    below = bool(np.all(min_gap <= bound + 1e-15))
    st.plots["thm62"] = {"T": T.tolist(), "min_gap": min_gap.tolist(), "gap": gaps.tolist(),
                         "bound": bound.tolist(), "est_gap": st.run_record["est_gap"],
                         "fit": None if fit is None else [fit.slope, fit.intercept]}
    if T_zero is not None and (fit is None or T_zero <= 0.5 * T[-1]):
        st.rows.append(row(NAME, ap, "log-log slope of min_{n<T} gap_n (true gap) vs T",
                           f"min-gap reached 0 (≤1e-12·gap0) at T={T_zero}; slope before: "
                           + ("n/a" if fit is None else f"{fit.slope:.3f} [{fit.ci_low:.3f}, {fit.ci_high:.3f}]"),
                           CR.HOLDS, "holds when an iterate is exactly stationary (min-gap ≤ 1e-12·gap0) "
                           "in the first half of the run; else " + CR.SLOPE_TEXT, T_zero=T_zero,
                           gap0=float(gaps[0])))
    elif fit is None:
        st.rows.append(row(NAME, ap, "log-log slope of min-gap vs T", "too few positive points",
                           CR.INCONCLUSIVE, CR.SLOPE_TEXT))
    else:
        st.rows.append(row(NAME, ap, "log-log slope of min_{n<T} gap_n (true gap) vs T",
                           f"{fit.slope:.3f} [{fit.ci_low:.3f}, {fit.ci_high:.3f}]; final min-gap "
                           f"{fmt(float(min_gap[-1]))} (gap0 {fmt(float(gaps[0]))})",
                           CR.slope_verdict(fit.ci_low, fit.ci_high), CR.SLOPE_TEXT,
                           slope=fit.slope, ci=[fit.ci_low, fit.ci_high], n_points=fit.n_points,
                           final_min_gap=float(min_gap[-1]), gap0=float(gaps[0])))
    verdict = (CR.HOLDS if below else CR.FAILS) if premise else CR.INCONCLUSIVE
    st.rows.append(row(NAME, ap, "bound sqrt(2Δ²M(F0−F*)/(Tρ(1−η)²)) vs measured min-gap",
                       f"bound(T_end) {fmt(float(bound[-1]))} vs {fmt(float(min_gap[-1]))}; Δ {fmt(Delta)}, "
                       f"M {fmt(st.M)}, F0−F* {fmt(F0 - Fstar)}, η {fmt(eta)}; F(s_T)−F(s0) "
                       f"{fmt(float(Fs[-1] - F0))}",
                       verdict, "holds if min-gap ≤ bound at every measured T, with the premise "
                       "χ ≤ ηp̃/(2+2η), η < 1/3; inconclusive if the premise fails (bound then shown with η=0); "
                       "F* = min F seen (makes the bound smaller, so 'holds' is conservative); ρ = 1",
                       Delta=Delta, M=st.M, F0=float(F0), Fstar=float(Fstar), eta=eta, rho=RHO,
                       premise=premise, below_bound=below, F_end=float(Fs[-1])))
