"""Check 5 — Theorem 6.5: the iteration after which the support of s (the rank pattern) never changes
again, and the strict-complementarity margin λ_min(s*) − 2χ at the last iterate (reference ∇F)."""
from __future__ import annotations

import torch

from .. import constants as C
from .. import criteria as CR
from ..study import Study, fmt, row

NAME = "Thm 6.5"


def run(st: Study):
    ap = st.ap
    S = st.run_record["s"]
    masks = [C.support(s, ap.eps, 1e-3, ap.tau) for s in S]
    n_id = C.identification_iteration(masks)
    T = len(S) - 1
    st.plots["support"] = torch.stack([s.double() for s in S]).numpy().tolist()
    last = st.run_record["ref_points"][-1]
    ci = C.strict_complementarity(last["grad"], last["s"], ap.tau, ap.eps)
    margin = ci.lambda_min - 2 * st.chi
    stable_from = n_id if n_id is not None else T
    stable = stable_from <= (1 - CR.THM65_STABLE_FRACTION) * T
    if margin > 0:
        verdict = CR.HOLDS if stable else CR.FAILS
    else:
        verdict = CR.INCONCLUSIVE
    changes = sum(int(not torch.equal(a, b)) for a, b in zip(masks[:-1], masks[1:]))
    st.rows.append(row(NAME, ap, "support identification & margin λ_min(s*) − 2χ",
                       f"support fixed from n={n_id} of {T} ({changes} changes), rank {int(masks[-1].sum())}"
                       f"/{ap.r_total}; margin {fmt(margin)} (λ_min {fmt(ci.lambda_min)}, 2χ {fmt(2 * st.chi)})",
                       verdict, f"premise: margin > 0 (strict complementarity beyond the noise); then holds "
                       f"if the support is unchanged over the last {CR.THM65_STABLE_FRACTION:.0%} of the run, "
                       "fails otherwise; inconclusive when the premise fails (s_T's reference gap used as s*)",
                       identified_at=n_id, T=T, changes=changes, margin=margin, lambda_min=ci.lambda_min,
                       chi=st.chi, face=ci.face, lambdas=ci.lambdas, final_gap=last["gap"],
                       exposed_equals_minimal=ci.exposed_equals_minimal))
