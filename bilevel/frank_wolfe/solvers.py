"""Frank-Wolfe solvers with explicit state: vanilla, away-step and pairwise.

    opt = AwayStepFW(S, step=ShortStep(lipschitz=M), gap_tol=p_tilde)
    state = opt.init(s0)
    s, state, info = opt.step(grad, state)          # grad: any estimate of the gradient at state.x
    state = opt.remove_coordinates(state, idx)      # truncation (dEBORA: ranks whose s_i sits at eps)

One step (the paper's Algorithm 1, steps 3-6), per atomic block b of the set:

    z = LMO(g)                              FW vertex;    gap_fw  = -g^T (z - x)
    y = argmax_{v active} g^T v             away vertex;  gap_away = -g^T (x - y),  lambda = weight of y
    VanillaFW:   d = z - x,  gamma_max = 1
    AwayStepFW:  FW if gap_fw >= gap_away, else d = x - y with gamma_max = lambda / (1 - lambda)
    PairwiseFW:  d = z - y,  gamma_max = lambda
    gamma = rule(...) clipped to [0, gamma_max];  x <- x + gamma d;  weights updated alongside

and an away/pairwise step with gamma = gamma_max sets the weight of y to exactly 0 ("drop"): the
active set is *defined* as {weights > 0}, so a dropped vertex can only come back through a later FW
step with a positive weight, never with weight 0 (the bug that stalls pairwise FW elsewhere).  x is
recomputed from the weights after every step (x = o + tau_c (w_plus - w_minus)), so the two are in
exact sync, and weights are renormalised per block against rounding drift.

If the total FW gap (sum over blocks) is <= ``gap_tol`` (paper: p_tilde), x and the weights are left
unchanged and every block reports kind "stationary" (the paper's step 4: s is stationary to tolerance).

Blocks: with ``blockwise=True`` (default) every atomic block of a ProductSet takes its own FW/away
decision and its own step size.  This is exact for the rule's quadratic model: the upper bound
g^T d + M/2 ||d||^2 is separable over blocks, so per-block short steps minimise it jointly and the
guaranteed decrease is at least that of one common step.  On a single set (one block) it is textbook
AFW/PFW.  ``blockwise=False`` takes one decision (by the summed gaps) and one step for the whole set.

Gradients are used as given (e.g. a noisy hypergradient): nothing assumes they are exact.  Host
syncs: one per step for the NaN/Inf check (``check_finite=False`` removes it), plus whatever a rule
needs to compare objective values (Armijo, adaptive ShortStep).  ``info.gap`` is a 0-dim tensor.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import check_finite, check_real, check_vector
from .sets import FeasibleSet, default_atol
from .state import AWAY, DROP, FW, NONE, PAIRWISE, STATIONARY, FWInfo, FWState
from .steps import ShortStep, StepContext, StepRule


class _FrankWolfe:
    mode = "vanilla"

    def __init__(self, feasible_set: FeasibleSet, step: Optional[StepRule] = None, *, gap_tol: float = 0.0,
                 blockwise: bool = True, check_finite: bool = True):
        if not isinstance(feasible_set, FeasibleSet):
            raise TypeError(f"feasible_set must be a FeasibleSet (e.g. FlooredSimplex(dim, tau, eps)), got "
                            f"{type(feasible_set).__name__}")
        if step is None:
            step = ShortStep()
        if not isinstance(step, StepRule):
            raise TypeError(f"step must be a step rule (ShortStep, Armijo, OpenLoop, Constant), got "
                            f"{type(step).__name__}")
        self.set = feasible_set
        self.rule = step
        self.gap_tol = check_real("gap_tol", gap_tol, nonnegative=True, hint=" (p_tilde, the FW-gap tolerance)")
        self.blockwise = bool(blockwise)
        self.check_finite = bool(check_finite)

    def __repr__(self):
        return (f"{type(self).__name__}({self.set!r}, step={self.rule!r}, gap_tol={self.gap_tol!r}, "
                f"blockwise={self.blockwise})")

    # ---- init ------------------------------------------------------------------------------------
    def init(self, x0: torch.Tensor, atol: Optional[float] = None,
             feasible_set: Optional[FeasibleSet] = None) -> FWState:
        """State at a feasible x0 (1-D floating tensor; the state lives on its dtype and device).

        x0 may violate S by at most ``atol`` (default 64 ulp relative to the set's scale); it is then
        snapped onto S through its barycentric weights.  Raises ValueError naming the violated
        constraint otherwise.  ``feasible_set`` starts on another set than the constructor's (e.g.
        after the caller truncated on its own); by default the constructor's set."""
        S = self.set if feasible_set is None else feasible_set
        if not isinstance(S, FeasibleSet):
            raise TypeError(f"feasible_set must be a FeasibleSet, got {type(S).__name__}")
        x0 = check_vector("x0", x0, S.dim)
        check_finite("x0", x0)
        msg = S.feasibility_error(x0, atol, name="x0")
        if msg is not None:
            raise ValueError(f"infeasible starting point: {msg}; start from a point of the set, e.g. "
                             f"S.project(x0) or S.lmo(zeros)")
        x0 = x0.detach()
        w = S.decompose(x0)
        x = S._L(x0).combine(w)
        return FWState(x=x, set=S, weights=w, n=0, rule_state=self.rule.init(x))

    # ---- step ------------------------------------------------------------------------------------
    def _check_state(self, state):
        if not isinstance(state, FWState):
            raise TypeError(f"state must be the FWState returned by init/step, got {type(state).__name__}")

    def step(self, grad: torch.Tensor, state: FWState, objective: Optional[Callable] = None):
        """One FW step from ``state`` with the gradient estimate ``grad``; returns (x, new_state, info).

        ``objective(x) -> scalar`` is only needed by Armijo / ShortStep without a Lipschitz constant.
        Bad input (wrong shape, NaN/Inf) raises before anything is computed; ``state`` is never modified.
        """
        self._check_state(state)
        S, x, w = state.set, state.x, state.weights
        g = check_vector("grad", grad, S.dim, like=x).detach()
        if self.check_finite:
            check_finite("grad", g, "; the state is unchanged (check the hypergradient estimate)")
        L = S._L(x)
        dim, B, mode = L.dim, L.B, self.mode
        per_c = L.per_coord                            # (B,) -> broadcastable over coordinates
        zeros_B = x.new_zeros(B)
        xr = x - L.offset
        sp = L.scale_c * g                              # <g, v - o_b> for the plus atoms

        # FW vertex (LMO), per block
        fw_score, z_atom, z_coord, z_val = S._fw_vertex(g, L, sp)
        gx = L.seg_sum(g * xr)                          # <g, x - o_b>
        gap_fw = (gx - fw_score).clamp_min(0)

        if mode == "vanilla":
            use_fw = torch.ones(B, dtype=torch.bool, device=x.device)
            gap_away = lam = y_atom = None
            gd = -gap_fw
            gamma_max = torch.ones_like(gap_fw)
            # d = z - x = (z - o) - (x - o)
            d = torch.zeros_like(x).scatter_(0, z_coord, z_val) - xr
        else:
            # away vertex: the active atom (weight > 0) with the largest <g, v>
            Mp, jp = L.seg_max(torch.where(w[:dim] > 0, sp, -torch.inf))
            if L.any_sym:
                Mm, jm = L.seg_max(torch.where(w[dim:L.a0] > 0, -sp, -torch.inf))
            else:
                Mm, jm = torch.full_like(Mp, -torch.inf), jp
            Mo = torch.where(w[L.a0:] > 0, zeros_B, -torch.inf)
            y_plus = Mp >= torch.maximum(Mm, Mo)
            y_minus = ~y_plus & (Mm >= Mo)
            y_origin = ~y_plus & ~y_minus
            away_score = torch.where(y_plus, Mp, torch.where(y_minus, Mm, Mo))
            y_atom = torch.where(y_origin, L.a0 + L.arange_B, torch.where(y_plus, jp, dim + jm))
            y_coord = torch.where(y_minus, jm, jp)
            y_val = torch.where(y_origin, zeros_B, torch.where(y_plus, L.scale, -L.scale))
            lam = w[y_atom]
            gap_away = (away_score - gx).clamp_min(0)
            if mode == "away":
                if self.blockwise or B == 1:
                    use_fw = gap_fw >= gap_away
                else:
                    use_fw = (gap_fw.sum() >= gap_away.sum()).expand(B)
                gd = torch.where(use_fw, -gap_fw, -gap_away)
                one = torch.ones_like(lam)
                gamma_max = torch.where(use_fw, one,
                                        torch.where(lam < 1, lam / torch.where(lam < 1, 1 - lam, one), torch.inf))
                # FW block: d = (z - o) - (x - o);  away block: d = (x - o) - (y - o)
                sign = torch.where(use_fw, -one, one)
                e = torch.zeros_like(x).scatter_(0, torch.where(use_fw, z_coord, y_coord),
                                                 torch.where(use_fw, z_val, -y_val))
                d = per_c(sign) * xr + e
            else:  # pairwise: d = z - y
                use_fw = torch.zeros(B, dtype=torch.bool, device=x.device)
                gd = -(gap_fw + gap_away)
                gamma_max = lam
                d = torch.zeros_like(x).scatter_(0, z_coord, z_val).index_add_(0, y_coord, -y_val)
        dn2 = L.seg_sum(d * d)

        gap = gap_fw.sum()
        stationary = gap <= self.gap_tol
        if self.blockwise or B == 1:
            ctx_gd, ctx_dn2, ctx_gmax, group_c = gd, dn2, gamma_max, (L.block_id if B > 1 else None)
        else:
            ctx_gd, ctx_dn2, ctx_gmax, group_c = gd.sum().reshape(1), dn2.sum().reshape(1), \
                gamma_max.min().reshape(1), None
        ctx = StepContext(x=x, grad=g, direction=d, gd=ctx_gd, dnorm2=ctx_dn2, gamma_max=ctx_gmax, group_c=group_c,
                          n=state.n, objective=objective, stationary=stationary)
        gamma_g, rule_state, n_evals = self.rule(ctx, state.rule_state)
        gamma_g = torch.minimum(gamma_g.clamp_min(0), ctx_gmax)
        gamma_g = torch.where((ctx_gd < 0) & ~stationary, gamma_g, torch.zeros_like(gamma_g))
        gamma = gamma_g if gamma_g.shape[0] == B else gamma_g.expand(B)

        # weight update (new tensors only: the old state is never written to)
        if mode == "vanilla":
            factor, add_z, sub_y = 1 - gamma, gamma, None
        elif mode == "away":
            factor = torch.where(use_fw, 1 - gamma, 1 + gamma)
            add_z = torch.where(use_fw, gamma, zeros_B)
            sub_y = torch.where(use_fw, zeros_B, gamma)
        else:
            factor, add_z, sub_y = None, gamma, gamma
        w_new = w * L.per_atom(factor) if factor is not None else w.clone()
        w_new.index_add_(0, z_atom, add_z)
        if sub_y is not None:
            w_new.index_add_(0, y_atom, -sub_y)
            wy = w_new[y_atom]
            # drop step: gamma hit gamma_max, the away vertex's weight is exactly 0 and it leaves the
            # active set (clamping also catches -1e-17 rounding just below gamma_max)
            drop = ~use_fw & (gamma > 0) & ((gamma >= gamma_max) | (wy <= 0)) & (y_atom != z_atom)
            w_new.scatter_(0, y_atom, torch.where(drop, zeros_B, wy.clamp_min(0)))
        else:
            drop = torch.zeros(B, dtype=torch.bool, device=x.device)
        # factors are >= 0 and y was clamped: all weights are >= 0 here
        w_new = w_new / L.per_atom(L.block_weight_sums(w_new))
        x_new = L.combine(w_new)

        moved = gamma > 0
        base = torch.full((B,), FW if mode != "pairwise" else PAIRWISE, dtype=torch.int8, device=x.device)
        if mode == "away":
            base = torch.where(use_fw, base, torch.full_like(base, AWAY))
        kinds = torch.where(drop, torch.full_like(base, DROP), base)
        kinds = torch.where(moved, kinds, torch.full_like(base, NONE))
        kinds = torch.where(stationary, torch.full_like(base, STATIONARY), kinds)

        new_state = FWState(x=x_new, set=S, weights=w_new, n=state.n + 1, rule_state=rule_state)
        info = FWInfo(gap=gap, away_gap=None if gap_away is None else gap_away.sum(), block_gaps=gap_fw,
                      kinds=kinds, step_size=gamma, gamma_max=gamma_max, stationary=stationary,
                      n_evals=n_evals, lipschitz=getattr(rule_state, "lipschitz", None), weights=w_new)
        return x_new, new_state, info

    # ---- truncation ------------------------------------------------------------------------------
    def at_floor(self, state: FWState, atol: Optional[float] = None) -> torch.Tensor:
        """Boolean mask (dim,) of coordinates at their floor (s_i = eps for FlooredSimplex).

        ``atol=None``: exactly, i.e. the coordinate's vertex (or vertices) carries weight 0 -- after a
        drop step this is exact, and x_i == eps bit for bit.  ``atol`` given: |x_i - floor_i| <= atol.
        """
        self._check_state(state)
        if atol is not None:
            return state.set.at_floor(state.x, atol)
        L = state.set._L(state.x)
        mask = state.weights[:L.dim] == 0
        if L.any_sym:
            mask = mask & (state.weights[L.dim:L.a0] == 0)
        return mask

    def remove_coordinates(self, state: FWState, idx, atol: Optional[float] = None) -> FWState:
        """Delete coordinates ``idx`` (1-D integer tensor of global indices into x, possibly spanning
        several ProductSet blocks) from the set, the iterate, the weights and the rule state.

        Every removed coordinate must be at its floor: |x_i - floor_i| <= atol (default 64 ulp of
        |floor| + tau).  Its vertex weight (at most ~atol/tau) moves to the block's origin vertex v_0
        (whose restriction to the remaining coordinates is the same point), so x on the remaining
        coordinates is unchanged and S' = FlooredSimplex(dim - k, tau, eps) still contains it (the
        removed s_i = eps used exactly eps of the budget tau + dim*eps).  For blocks without origin
        vertex (probability simplex, l1 ball) the residual weight is renormalised away.

        Refuses (ValueError, state unchanged) to remove the last coordinate of a block of a
        ProductSet or of a simple set (a layer keeps rank >= 1; rebuild the set to drop a layer);
        a Box's coordinates are independent intervals, so a Box may lose any of them but not all.
        """
        self._check_state(state)
        S, x, w = state.set, state.x, state.weights
        keep_cpu = S._keep_mask(idx)
        removed = torch.nonzero(~keep_cpu).flatten()
        if removed.numel() == 0:
            return state
        S._check_keep(keep_cpu)
        L = S._L(x)
        kept_per_block = torch.zeros(L.B, dtype=torch.long).index_add_(0, L.block_id.cpu(), keep_cpu.long())
        dev = (x - L.offset).abs().cpu()
        if atol is None:
            tol = default_atol(x.dtype) * (L.offset.abs() + L.scale_c).cpu()
        else:
            tol = torch.full_like(dev, check_real("atol", atol, nonnegative=True))
        bad = (~keep_cpu) & (dev > tol)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"coordinate {i} is not at its floor: x[{i}] = {x[i].item()!r}, floor "
                             f"{L.offset[i].item()!r}, |x - floor| = {dev[i].item():.3g} > atol = "
                             f"{tol[i].item():.3g}; its vertex still carries weight. Remove only coordinates "
                             f"selected by opt.at_floor(state) (or pass a larger atol)")
        keep = keep_cpu.to(x.device)
        rem = (~keep).to(w.dtype)
        dim = L.dim
        wp = w[:dim]
        w0 = w[L.a0:]
        mass_p = L.seg_sum(wp * rem)
        if L.any_sym:
            wm = w[dim:L.a0]
            mass_m = L.seg_sum(wm * rem)
            pair = L.seg_sum(torch.minimum(wp, wm) * rem)
        else:
            wm, mass_m, pair = None, torch.zeros_like(mass_p), torch.zeros_like(mass_p)
        # origin blocks: removed weight -> origin vertex; symmetric: cancelling +-pairs -> first kept coord
        w0 = w0 + torch.where(L.has_origin, mass_p + mass_m, torch.zeros_like(mass_p))
        first_kept = torch.full((L.B,), dim, dtype=torch.long, device=x.device).scatter_reduce(
            0, L.block_id, torch.where(keep, L.arange_dim, dim), "amin")
        S_new = S._restrict(keep_cpu)
        L_new = S_new._L(x)
        block_kept = (kept_per_block > 0).to(x.device)
        if L.any_sym:
            add = torch.where(L.symmetric & block_kept, pair, torch.zeros_like(pair))
            tgt = first_kept.clamp(max=dim - 1)
            wp = wp.index_add(0, tgt, add)
            wm = wm.index_add(0, tgt, add)
        parts = [wp[keep]]
        if L_new.any_sym:
            parts.append(wm[keep])
        parts.append(w0[block_kept])
        w_new = torch.cat(parts)
        w_new = w_new * L_new.atom_exists
        # blocks with an origin vertex kept their total weight (removed weight moved to v_0): leave them
        # bit-for-bit alone so that x on the kept coordinates is unchanged; renormalise the others
        sums = L_new.block_weight_sums(w_new)
        sums = torch.where(L_new.has_origin, torch.ones_like(sums), sums)
        w_new = w_new / sums[L_new.atom_block]
        x_new = L_new.combine(w_new)
        return FWState(x=x_new, set=S_new, weights=w_new, n=state.n,
                       rule_state=self.rule.restrict(state.rule_state, keep))


class VanillaFW(_FrankWolfe):
    """Frank-Wolfe with FW steps only (O(1/n) on smooth convex problems, sublinear on faces).

    Weights are still tracked, so truncation and the active set work the same for every solver."""

    mode = "vanilla"


class AwayStepFW(_FrankWolfe):
    """Away-step Frank-Wolfe (Guelat & Marcotte 1986; Lacoste-Julien & Jaggi 2015): linear convergence
    for strongly convex objectives over polytopes, finite identification of the optimal face; the
    paper's Algorithm 1 with stochastic gradients."""

    mode = "away"


class PairwiseFW(_FrankWolfe):
    """Pairwise Frank-Wolfe (Lacoste-Julien & Jaggi 2015): moves weight lambda from the away vertex y
    to the FW vertex z, d = z - y, gamma_max = lambda."""

    mode = "pairwise"


__all__ = ["VanillaFW", "AwayStepFW", "PairwiseFW"]
