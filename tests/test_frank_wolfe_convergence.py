"""Convergence of the FW solvers on f(x) = 1/2 ||x - c||^2 (L = mu = 1) over the probability simplex and
the floored simplex, with the optimum x* in the relative interior of a face (float64).

Instances are built from the KKT conditions, so x* is known exactly: pick the support I, x*_I > floor
with sum(x* - floor) = budget, a multiplier theta > 0 of the budget constraint and margins mu_i >= 0.2
off the support; then c = x* + theta*1 - mu.  The sort-based projection must return x* (checked).

Theory (Lacoste-Julien & Jaggi 2015, Thm. 1): with short steps, every "good" step of away-step FW
contracts h = f - f* by (1 - rho), rho = mu/(4L) (delta/D)^2, delta the pyramidal width and D the
diameter.  Both simplices here are tau-scaled simplices with delta >= tau/sqrt(d) (facial distance,
Pena & Rodriguez 2018) and D = tau*sqrt(2), so rho >= 1/(8d).  Drop steps are at most the FW steps
plus the initial active set, so at most 2*N_good + 1 iterations are needed, N_good =
ceil(ln(h0/h_target)/rho).  The FW gap is bounded by h + L*D*sqrt(2h/mu), which fixes h_target for
gap <= 1e-10.  Vanilla FW is sublinear when x* is on a face not containing the start (Wolfe's zig-zag)
and must not reach the target within the same budget.
"""
import math

import pytest
import torch

from bilevel import frank_wolfe as fw

F64 = torch.float64
TARGET = 1e-10


def face_instance(kind, d, k, seed, tau=1.0, eps=0.01):
    gen = torch.Generator().manual_seed(seed)
    if kind == "prob":
        S, floor, budget = fw.ProbabilitySimplex(d), 0.0, 1.0
    else:
        S, floor, budget = fw.FlooredSimplex(d, tau, eps), eps, tau
    I = torch.randperm(d, generator=gen)[:k]
    u = torch.rand(k, dtype=F64, generator=gen) + 0.2
    xs = torch.full((d,), floor, dtype=F64)
    xs[I] += u / u.sum() * budget
    mu = torch.rand(d, dtype=F64, generator=gen) * 0.8 + 0.2
    mu[I] = 0.0
    theta = 0.3
    c = xs + theta - mu
    assert torch.allclose(S.project(c), xs, atol=1e-14, rtol=0)
    support = torch.zeros(d, dtype=torch.bool)
    support[I] = True
    return S, c, xs, support, float(mu[~support].min())


def iteration_bound(S, c, x0, d):
    f = lambda x: 0.5 * float(((x - c) ** 2).sum())  # noqa: E731
    h0 = f(x0) - f(S.project(c))
    D = math.sqrt(2) * float(S.layout(F64).scale.max())
    # gap <= h + D*sqrt(2h) <= TARGET if h <= h_t
    h_t = (TARGET / (2 * D * math.sqrt(2))) ** 2
    rho = 1.0 / (8 * d)
    return 2 * math.ceil(math.log(h0 / h_t) / rho) + 1


def start_vertex(S, support):
    """A vertex off the optimal face: the floor vertex, or e_j with j outside the support."""
    if isinstance(S, fw.FlooredSimplex):
        return S.lmo(torch.zeros(S.dim, dtype=F64))
    j = int(torch.nonzero(~support)[0])
    return torch.eye(S.dim, dtype=F64)[j]


def run(opt, x0, c, K, stop_at=None):
    state = opt.init(x0)
    gaps = []
    for k in range(K):
        _, state, info = opt.step(state.x - c, state)
        gaps.append(info.gap)
        if stop_at is not None and k % 50 == 0 and float(info.gap) <= stop_at:
            break
    return state, torch.stack(gaps)


CASES = [("prob", 6, 3, 0), ("floored", 6, 3, 1), ("floored", 6, 2, 2)]


@pytest.mark.parametrize("kind,d,k,seed", CASES)
def test_away_and_pairwise_converge_linearly_where_vanilla_does_not(kind, d, k, seed):
    S, c, xs, support, _ = face_instance(kind, d, k, seed)
    x0 = start_vertex(S, support)
    K = iteration_bound(S, c, x0, d)
    assert K < 10_000   # the bound is finite and explicit (about 4.7e3 here)
    for solver in (fw.AwayStepFW, fw.PairwiseFW):
        state, gaps = run(solver(S, step=fw.ShortStep(lipschitz=1.0)), x0, c, K, stop_at=TARGET)
        hit = torch.nonzero(gaps <= TARGET)
        assert hit.numel() > 0, f"{solver.__name__} did not reach gap {TARGET} within {K} iterations"
        # gap >= h >= ||x - x*||^2 / 2 (mu = 1): the iterate is that close to the known optimum
        first = int(hit[0])
        assert first < K
    vanilla_gaps = run(fw.VanillaFW(S, step=fw.ShortStep(lipschitz=1.0), check_finite=False), x0, c, K)[1]
    assert float(vanilla_gaps.min()) > 100 * TARGET, "vanilla FW unexpectedly reached the target"


@pytest.mark.parametrize("solver", [fw.AwayStepFW, fw.PairwiseFW])
@pytest.mark.parametrize("kind,d,k,seed", CASES[:2])
def test_sparse_support_is_identified_in_finitely_many_steps_and_kept(solver, kind, d, k, seed):
    S, c, xs, support, _ = face_instance(kind, d, k, seed)
    opt = solver(S, step=fw.ShortStep(lipschitz=1.0))
    state = opt.init(start_vertex(S, support))
    supports, reached = [], None
    for t in range(3000):
        _, state, info = opt.step(state.x - c, state)
        supports.append(~opt.at_floor(state))
        if reached is None and float(info.gap) <= TARGET:
            reached = t
        if reached is not None and t >= reached + 200:
            break
    assert reached is not None
    # the support of the iterate (coordinates above the floor, exactly: weight > 0) ...
    changes = [t for t in range(1, len(supports)) if not torch.equal(supports[t], supports[t - 1])]
    last_change = changes[-1] if changes else 0
    assert torch.equal(supports[-1], support)           # ... is the optimal one
    assert last_change <= reached                       # ... found no later than the gap target
    assert len(supports) - last_change >= 200           # ... and never changes afterwards
    assert float((state.x - xs).norm()) <= math.sqrt(2 * TARGET) * 1.01


@pytest.mark.parametrize("solver", [fw.AwayStepFW, fw.PairwiseFW])
def test_identification_with_noisy_gradients(solver):
    """Stochastic use (Theorem 6.5): noise chi well below the complementarity margin lambda_min; the
    support is identified and kept although the gap never certifies convergence."""
    S, c, xs, support, margin = face_instance("floored", 8, 3, 5)
    gen = torch.Generator().manual_seed(0)
    sigma = margin / 40
    opt = solver(S, step=fw.ShortStep(lipschitz=4.0))     # M > L: damped steps against noise
    state = opt.init(start_vertex(S, support))
    supports = []
    for t in range(600):
        g = state.x - c + sigma * (2 * torch.rand(8, dtype=F64, generator=gen) - 1)
        _, state, info = opt.step(g, state)
        supports.append(~opt.at_floor(state))
    tail = supports[300:]
    assert all(torch.equal(s, support) for s in tail)
    assert float((state.x - xs).abs().max()) <= 2 * sigma          # stays O(chi) from x*


def test_product_set_converges_per_block():
    """500 blocks, blockwise away steps: all blocks reach their own optimum, gap summed over blocks."""
    torch.manual_seed(0)
    blocks = [fw.FlooredSimplex(4, 1.0, 1e-3)] * 200 + [fw.FlooredSimplex(3, 2.0, 0.01)] * 300
    P = fw.ProductSet(blocks)
    c = torch.randn(P.dim, dtype=F64)
    xs = P.project(c)
    opt = fw.AwayStepFW(P, step=fw.ShortStep(lipschitz=1.0))
    state = opt.init(P.lmo(torch.zeros(P.dim, dtype=F64)))
    for t in range(400):
        _, state, info = opt.step(state.x - c, state)
        if t % 20 == 0 and float(info.gap) <= 1e-9:
            break
    assert float(info.gap) <= 1e-9
    assert float((state.x - xs).abs().max()) <= math.sqrt(2e-9)
