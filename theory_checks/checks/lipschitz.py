"""Check 3 — the Lipschitz constant M of ∇F: finite-difference Hessian norm of the reference at s0
(two step sizes, small problems) and secants ‖∇F(s_{n+1}) − ∇F(s_n)‖/‖s_{n+1} − s_n‖ along the
iterates of Algorithm 1."""
from __future__ import annotations

import math
import time

import torch

from .. import constants as C
from .. import criteria as CR
from ..study import Study, fmt, row

NAME = "Lipschitz M"


def local(st: Study):
    """M at s0 before the run (used by the short step)."""
    ap = st.ap
    reg = st.regime_points()
    s0, y0 = reg["s0"], reg["ref0"]["y"]
    grad_fn = lambda s: st.reference(s, y0)["grad"]  # noqa: E731
    if st.cfg.fd_check:
        m1 = C.hessian_norm_fd(grad_fn, s0, h=1e-3 * ap.tau)
        m2 = C.hessian_norm_fd(grad_fn, s0, h=1e-4 * ap.tau)
        st.M_fd = (m1.value, m2.value)
        st.M0 = max(m1.value, m2.value)
    else:   # one secant towards the first FW vertex (a lower bound on M)
        g0 = reg["ref0"]["grad"]
        V = st.vertices()
        v = V[int((V @ g0).argmin())]
        s_h = s0 + 0.05 * (v - s0)
        g_h = grad_fn(s_h)
        st.M_fd = None
        st.M0 = float((g_h - g0).norm() / (s_h - s0).norm())
    st.M0 = max(st.M0, 1e-12)
    return st.M0


def run(st: Study):
    ap = st.ap
    rec = st.run_record
    pts = [p for p in rec["ref_points"]]
    sec = C.secant_lipschitz([p["s"] for p in pts], [p["grad"] for p in pts])
    M_path = max(sec) if sec else float("nan")
    st.M = max(st.M0, M_path if math.isfinite(M_path) else 0.0)
    st.plots["secants"] = sec
    if st.M_fd is not None:
        a, b = st.M_fd
        agree = abs(a - b) <= CR.M_FD_AGREEMENT * max(a, b)
        verdict = CR.HOLDS if agree else CR.INCONCLUSIVE
        crit = (f"holds if the FD Hessian norms at h=1e-3τ and 1e-4τ agree within {CR.M_FD_AGREEMENT:.0%} "
                "(∇F is C^1,1 near s0); M reported = max(FD, secants along the run)")
        val = f"M {fmt(st.M)}; FD {fmt(a)} / {fmt(b)}; max secant {fmt(M_path)}"
    else:
        verdict = CR.INCONCLUSIVE
        crit = "inconclusive by construction: only secants (lower bounds on M) are affordable here"
        val = f"M ≥ {fmt(st.M)} (secant at s0 {fmt(st.M0)}, max along run {fmt(M_path)})"
    st.rows.append(row(NAME, ap, "Lipschitz constant of ∇F along the iterates", val, verdict, crit,
                       M=st.M, M0=st.M0, M_fd=st.M_fd, secants=sec))
