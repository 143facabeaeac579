"""Invariants of the FW solvers under random and adversarial (noisy, huge, sign-flipping) gradients:
feasibility, barycentric weights, immutability of states, step kinds, p_tilde stop, bad input (float64)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel import frank_wolfe as fw

F64 = torch.float64
SOLVERS = [fw.VanillaFW, fw.AwayStepFW, fw.PairwiseFW]


@st.composite
def feasible_sets(draw):
    kind = draw(st.sampled_from(["floored", "prob", "l1", "box", "product", "mixed"]))
    dim = draw(st.integers(1, 8))
    tau = draw(st.sampled_from([1e-3, 1.0, 16.0, 1e3]))
    eps = draw(st.sampled_from([0.0, 1e-3, 1.0]))
    if kind == "floored":
        return fw.FlooredSimplex(dim, tau, eps)
    if kind == "prob":
        return fw.ProbabilitySimplex(dim)
    if kind == "l1":
        return fw.L1Ball(dim, tau)
    if kind == "box":
        lo = torch.linspace(-1, 1, dim, dtype=F64) * tau
        return fw.Box(lo, lo + tau)
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    blocks = [fw.FlooredSimplex(r, tau * (1 + i), eps) for i, r in enumerate(sizes)]
    if kind == "mixed":
        blocks += [fw.L1Ball(2, tau), fw.ProbabilitySimplex(3), fw.Box([0.0], [tau])]
    return fw.ProductSet(blocks)


def start_point(S, how, gen):
    if how == "vertex":
        return S.lmo(torch.randn(S.dim, dtype=F64, generator=gen))
    if how == "floor":
        return S.lmo(torch.zeros(S.dim, dtype=F64))
    # a random convex combination of a few LMO vertices
    vs = torch.stack([S.lmo(torch.randn(S.dim, dtype=F64, generator=gen)) for _ in range(4)])
    lam = torch.rand(4, dtype=F64, generator=gen)
    return (lam / lam.sum()) @ vs


def adversarial_grad(S, x, k, gen, kind):
    d = S.dim
    if kind == "noisy":      # a noisy gradient of 1/2||x - c||^2
        return x - 0.3 + torch.randn(d, dtype=F64, generator=gen)
    if kind == "huge":       # magnitudes across 12 orders, random signs
        return torch.randn(d, dtype=F64, generator=gen) * 10 ** (12 * torch.rand(d, dtype=F64, generator=gen) - 6)
    if kind == "flip":       # pushes towards a corner, then back (forces away and drop steps)
        g = torch.zeros(d, dtype=F64)
        g[k % d] = (-1.0) ** (k // d) * 1e3
        return g
    if kind == "ties":
        return torch.randint(-1, 2, (d,), generator=gen).to(F64)
    return torch.randn(d, dtype=F64, generator=gen)


def check_invariants(S, state, tol=1e-12, A=None):
    """x in S to tol; weights >= 0, exactly 0 on non-existent atoms, summing to 1 per block; A^T w = x."""
    x, w = state.x, state.weights
    assert state.set is S
    L = S.layout(F64)
    assert S.feasibility_error(x, atol=tol) is None, S.feasibility_error(x, atol=tol)
    assert bool((w >= 0).all())
    assert bool((w[~L.atom_exists] == 0).all())
    sums = torch.zeros(L.B, dtype=F64).index_add_(0, L.atom_block, w)
    assert float((sums - 1).abs().max()) <= tol
    recon = (S.atoms(F64) if A is None else A).T @ w                               # independent dense reconstruction
    scale = float(L.offset.abs().max() + L.scale.max())
    assert float((recon - x).abs().max()) <= tol * max(1.0, scale)


@settings(max_examples=15)
@given(st.data())
def test_iterates_stay_feasible_with_exact_barycentric_weights(data):
    S = data.draw(feasible_sets())
    solver = data.draw(st.sampled_from(SOLVERS))
    rule = data.draw(st.sampled_from([fw.ShortStep(lipschitz=1.0), fw.ShortStep(lipschitz=1e-6), fw.ShortStep(),
                                      fw.OpenLoop(), fw.Constant(1.0), fw.Constant(0.3)]))
    kind = data.draw(st.sampled_from(["noisy", "huge", "flip", "ties", "random"]))
    blockwise = data.draw(st.booleans())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    opt = solver(S, step=rule, blockwise=blockwise)
    state = opt.init(start_point(S, data.draw(st.sampled_from(["vertex", "floor", "mix"])), gen))
    A = S.atoms(F64)
    check_invariants(S, state, A=A)
    tol = 1e-12 * max(1.0, float(S.layout(F64).scale.max()))
    for k in range(60):
        g = adversarial_grad(S, state.x, k, gen, kind)
        x, state, info = opt.step(g, state)
        check_invariants(S, state, tol, A)
        assert torch.equal(x, state.x)
        # a dropped vertex never lingers with weight 0: the away vertex always has weight lambda > 0,
        # so gamma_max (1, lambda/(1-lambda) or lambda) is never 0 -- the stall of pairwise FW elsewhere
        assert bool((info.gamma_max > 0).all())
        assert bool((info.step_size >= 0).all()) and bool((info.step_size <= info.gamma_max).all())
        assert float(info.gap) >= 0 and info.kind in fw.KINDS + ("mixed",)


@pytest.mark.parametrize("solver", SOLVERS)
def test_long_adversarial_run_single_set(solver):
    """Thousands of steps on the paper's set: feasibility and weights hold to 1e-12 throughout."""
    S = fw.FlooredSimplex(6, 16.0, 1e-3)
    gen = torch.Generator().manual_seed(1)
    opt = solver(S, step=fw.ShortStep(lipschitz=0.5))
    state = opt.init(S.lmo(torch.zeros(6, dtype=F64)))
    kinds = set()
    for k in range(2000):
        g = adversarial_grad(S, state.x, k, gen, ["noisy", "flip", "huge", "ties"][k % 4])
        _, state, info = opt.step(g, state)
        kinds.add(info.kind)
        if k % 50 == 0:
            check_invariants(S, state, 1e-12 * 16)
    check_invariants(S, state, 1e-12 * 16)
    expected = {fw.VanillaFW: {"fw"}, fw.AwayStepFW: {"fw", "away", "drop"},
                fw.PairwiseFW: {"pairwise", "drop"}}[solver]
    assert expected <= kinds


def test_drop_step_sets_weight_exactly_zero_and_x_exactly_to_floor():
    S = fw.FlooredSimplex(3, 1.0, 0.1)
    opt = fw.AwayStepFW(S, step=fw.ShortStep(lipschitz=1e-9))   # tiny M: steps hit gamma_max
    x0 = torch.tensor([0.4, 0.3, 0.1], dtype=F64)                # weights (0.3, 0.2, 0, 0.5)
    state = opt.init(x0)
    g = torch.tensor([5.0, -1.0, 0.0], dtype=F64)   # FW vertex e_2 (gap 1.1 - (-1)...), away vertex e_1
    x, state, info = opt.step(g, state)
    # gap_fw = g.(x - z) = (2 - 0.3) - (-1.1 + 0.3) ... compare with the definitions directly
    z = S.lmo(g)
    assert float(info.gap) == pytest.approx(float(g @ (x0 - z)), abs=1e-15)
    assert info.kind == "drop"
    assert float(state.weights[0]) == 0.0 and float(x[0]) == 0.1     # exact, bit for bit
    assert float(info.step_size[0]) == pytest.approx(0.3 / 0.7, rel=1e-15)
    # next step: the dropped vertex is not the away vertex (it is not active)
    _, state2, info2 = opt.step(g, state)
    assert info2.kind != "drop" or float(state2.weights[0]) == 0.0
    assert bool(opt.at_floor(state)[0]) and not bool(opt.at_floor(state)[1])


def test_pairwise_moves_mass_from_away_to_fw_vertex():
    S = fw.ProbabilitySimplex(3)
    opt = fw.PairwiseFW(S, step=fw.Constant(0.1))
    state = opt.init(torch.tensor([0.5, 0.5, 0.0], dtype=F64))
    x, state, info = opt.step(torch.tensor([1.0, 0.0, -1.0], dtype=F64), state)
    assert info.kind == "pairwise"
    assert torch.allclose(x, torch.tensor([0.4, 0.5, 0.1], dtype=F64), atol=1e-15)
    # gamma_max = weight of the away vertex e_0 = 0.4 -> full transfer is a drop
    x, state, info = opt.step(torch.tensor([1.0, 0.0, -1.0], dtype=F64), state.__class__(
        x=state.x, set=state.set, weights=state.weights, n=state.n, rule_state=state.rule_state))
    opt_big = fw.PairwiseFW(S, step=fw.Constant(1.0))
    x, state, info = opt_big.step(torch.tensor([1.0, 0.0, -1.0], dtype=F64), state)
    assert info.kind == "drop" and float(state.weights[0]) == 0.0
    assert torch.allclose(x, torch.tensor([0.0, 0.5, 0.5], dtype=F64), atol=1e-15)


def test_gap_tolerance_p_tilde_leaves_x_unchanged_and_says_so():
    S = fw.FlooredSimplex(4, 1.0, 0.01)
    c = torch.tensor([0.3, 0.2, 0.05, -1.0], dtype=F64)
    opt = fw.AwayStepFW(S, step=fw.ShortStep(lipschitz=1.0), gap_tol=1e-3)
    state = opt.init(S.lmo(torch.zeros(4, dtype=F64)))
    for _ in range(200):
        x_old = state.x
        x, state, info = opt.step(state.x - c, state)
        if bool(info.stationary):
            assert float(info.gap) <= 1e-3
            assert info.kind == "stationary"
            assert torch.equal(x, x_old) and float(info.step_size.max()) == 0.0
            break
        assert float(info.gap) > 1e-3
    else:
        pytest.fail("never reached gap <= p_tilde")
    assert state.n == len(range(_ + 1))


def test_states_are_never_mutated():
    S = fw.ProductSet([fw.FlooredSimplex(3, 1.0, 0.1), fw.FlooredSimplex(2, 2.0, 0.1)])
    for solver in SOLVERS:
        opt = solver(S, step=fw.ShortStep())
        s0 = opt.init(S.lmo(torch.zeros(5, dtype=F64)))
        snap = (s0.x.clone(), s0.weights.clone())
        g = torch.tensor([-1.0, 2.0, 0.5, -3.0, 1.0], dtype=F64)
        _, s1, _ = opt.step(g, s0)
        _, s2, _ = opt.step(-g, s1)
        assert torch.equal(s0.x, snap[0]) and torch.equal(s0.weights, snap[1])
        _, s1b, _ = opt.step(g, s0)          # replaying from an old state gives the same result
        assert torch.equal(s1b.x, s1.x)
        s3 = opt.remove_coordinates(s2, torch.nonzero(opt.at_floor(s2)).flatten()[:1])
        assert s2.x.shape == (5,) and s3.x.shape[0] <= 5


@pytest.mark.parametrize("solver", SOLVERS)
def test_product_set_equals_independent_runs_per_block(solver):
    """Blockwise steps on a ProductSet of uneven blocks == running each block alone (separable f)."""
    torch.manual_seed(3)
    blocks = [fw.FlooredSimplex(r, 1.0 + 0.5 * i, 0.01 * i) for i, r in enumerate([3, 1, 5, 2])]
    P = fw.ProductSet(blocks)
    c = torch.randn(P.dim, dtype=F64)
    optP = solver(P, step=fw.ShortStep(lipschitz=1.0))
    sP = optP.init(P.lmo(torch.zeros(P.dim, dtype=F64)))
    singles = [(solver(b, step=fw.ShortStep(lipschitz=1.0)), sl) for b, sl in zip(blocks, P.block_slices())]
    sS = [o.init(b.lmo(torch.zeros(b.dim, dtype=F64))) for (o, _), b in zip(singles, blocks)]
    for _ in range(40):
        _, sP, infoP = optP.step(sP.x - c, sP)
        for k, ((o, sl), s) in enumerate(zip(singles, sS)):
            _, sS[k], info = o.step(s.x - c[sl], s)
    assert torch.allclose(sP.x, torch.cat([s.x for s in sS]), atol=1e-13, rtol=0)


def test_blockwise_false_takes_one_common_step():
    P = fw.ProductSet([fw.FlooredSimplex(2, 1.0, 0.0), fw.FlooredSimplex(2, 1.0, 0.0)])
    opt = fw.VanillaFW(P, step=fw.OpenLoop(), blockwise=False)
    state = opt.init(torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=F64))
    _, state, info = opt.step(torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=F64), state)
    # textbook FW on the product: z = (e_2, 0) (block 2 has g = 0: its LMO is the floor vertex), and
    # both blocks move with the same open-loop step 2/(0+2) = 1
    assert info.step_size.tolist() == [1.0, 1.0]
    assert state.x.tolist() == [0.0, 1.0, 0.0, 0.0]
    opt = fw.VanillaFW(P, step=fw.OpenLoop(), blockwise=True)
    _, state, info = opt.step(torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=F64),
                              opt.init(torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=F64)))
    # blockwise: block 2 predicts no descent (g^T d = 0) and stays
    assert info.step_size.tolist() == [1.0, 0.0]
    assert state.x.tolist() == [0.0, 1.0, 0.0, 0.5]


def test_step_rules():
    S = fw.FlooredSimplex(5, 1.0, 0.0)
    c = torch.tensor([0.6, 0.5, -0.2, 0.1, 0.0], dtype=F64)
    f = lambda x: 0.5 * ((x - c) ** 2).sum()  # noqa: E731
    x0 = S.lmo(torch.zeros(5, dtype=F64))
    for rule in [fw.Armijo(f), fw.ShortStep(objective=f), fw.ShortStep(lipschitz=1.0), fw.ShortStep()]:
        opt = fw.AwayStepFW(S, step=rule)
        state = opt.init(x0)
        vals = [float(f(state.x))]
        for _ in range(60):
            _, state, info = opt.step(state.x - c, state)
            vals.append(float(f(state.x)))
        # exact gradients: Armijo and the backtracked/fixed short step never increase f
        if not (isinstance(rule, fw.ShortStep) and rule.lipschitz is None and rule.objective is None):
            assert all(b <= a + 1e-15 for a, b in zip(vals, vals[1:])), rule
        assert float(info.gap) < 1e-8, rule
    # objective per call, and the missing-objective error
    opt = fw.AwayStepFW(S, step=fw.Armijo())
    st0 = opt.init(x0)
    _, _, info = opt.step(st0.x - c, st0, objective=f)
    assert info.n_evals >= 2
    with pytest.raises(ValueError, match="Armijo needs an objective"):
        opt.step(st0.x - c, st0)
    # open loop 2/(n+2) and constant, capped by gamma_max = 1
    opt = fw.VanillaFW(S, step=fw.OpenLoop())
    s = opt.init(x0)
    steps = []
    for k in range(3):   # each gradient points at a new vertex, so every step has a positive gap
        _, s, info = opt.step(-torch.eye(5, dtype=F64)[k], s)
        steps.append(float(info.step_size))
    assert steps == [1.0, 2 / 3, 0.5]
    opt = fw.VanillaFW(S, step=fw.Constant(5.0))
    _, _, info = opt.step(-torch.ones(5, dtype=F64), opt.init(x0))
    assert float(info.step_size) == 1.0
    with pytest.raises(ValueError, match=r"lipschitz must be > 0, got -1\.0"):
        fw.ShortStep(lipschitz=-1.0)
    with pytest.raises(ValueError, match=r"gamma must be > 0, got 0\.0"):
        fw.Constant(0.0)


# ---- bad input: clear errors, state untouched --------------------------------------------------
def test_bad_start_and_bad_gradients_leave_state_untouched():
    S = fw.FlooredSimplex(3, 1.0, 0.1)
    opt = fw.AwayStepFW(S, step=fw.ShortStep(lipschitz=1.0))
    with pytest.raises(ValueError, match=r"infeasible starting point: x0\[1\] = 0\.05 is below its floor 0\.1"):
        opt.init(torch.tensor([0.2, 0.05, 0.1], dtype=F64))
    with pytest.raises(ValueError, match=r"infeasible starting point: sum of x0 .* is 1\.5 > tau \+ dim\*eps = 1\.3"):
        opt.init(torch.tensor([0.5, 0.5, 0.5], dtype=F64))
    with pytest.raises(ValueError, match=r"x0 has shape \(2,\), expected \(3,\)"):
        opt.init(torch.tensor([0.5, 0.5], dtype=F64))
    with pytest.raises(ValueError, match=r"x0\[0\] = nan"):
        opt.init(torch.tensor([float("nan"), 0.5, 0.5], dtype=F64))
    with pytest.raises(ValueError, match=r"sum of x0 .* must be 1"):
        fw.AwayStepFW(fw.ProbabilitySimplex(2)).init(torch.tensor([0.5, 0.4], dtype=F64))
    with pytest.raises(ValueError, match=r"x0\[1\] = 3\.0 is above its upper bound 2\.0"):
        fw.AwayStepFW(fw.Box([0.0, 0.0], [1.0, 2.0])).init(torch.tensor([0.5, 3.0], dtype=F64))
    state = opt.init(torch.tensor([0.2, 0.3, 0.1], dtype=F64))
    _, state, _ = opt.step(torch.tensor([1.0, -1.0, 0.0], dtype=F64), state)
    snap = (state.x.clone(), state.weights.clone(), state.n)
    bad = [
        (torch.tensor([0.0, float("nan"), 1.0], dtype=F64), ValueError, r"grad\[1\] = nan .*state is unchanged"),
        (torch.tensor([float("inf"), 0.0, 1.0], dtype=F64), ValueError, r"grad\[0\] = inf"),
        (torch.tensor([1e308, 1e308, -float("inf")], dtype=F64), ValueError, r"grad\[2\] = -inf"),
        (torch.zeros(4, dtype=F64), ValueError, r"grad has shape \(4,\), expected \(3,\)"),
        (torch.zeros(3, 1, dtype=F64), ValueError, r"grad has shape \(3, 1\)"),
        ([0.0, 1.0, 2.0], TypeError, r"grad must be a torch.Tensor"),
        (torch.zeros(3, dtype=torch.long), TypeError, r"grad must be a floating tensor"),
    ]
    for g, exc, match in bad:
        with pytest.raises(exc, match=match):
            opt.step(g, state)
        assert torch.equal(state.x, snap[0]) and torch.equal(state.weights, snap[1]) and state.n == snap[2]
    # 1e308 entries whose sum overflows are still accepted (the fast finiteness test falls through)
    opt.step(torch.tensor([1e308, 1e308, 0.0], dtype=F64), state)
    with pytest.raises(TypeError, match="state must be the FWState"):
        opt.step(torch.zeros(3, dtype=F64), {"x": state.x})
    with pytest.raises(ValueError, match=r"gap_tol must be >= 0, got -1\.0"):
        fw.AwayStepFW(S, gap_tol=-1.0)
    with pytest.raises(TypeError, match="feasible_set must be a FeasibleSet"):
        fw.AwayStepFW("simplex")


def test_float32_iterates_and_gradient_dtype_cast():
    S = fw.ProductSet([fw.FlooredSimplex(4, 16.0, 1e-3)] * 3)
    opt = fw.AwayStepFW(S, step=fw.ShortStep(lipschitz=1.0))
    state = opt.init(S.lmo(torch.zeros(12)))
    c = torch.linspace(-1, 5, 12)
    for _ in range(50):
        x, state, info = opt.step((state.x - c).double(), state)    # float64 grad cast to x's dtype
    assert x.dtype == torch.float32 and info.gap.dtype == torch.float32
    assert S.feasibility_error(x.double(), atol=1e-5) is None
    assert torch.allclose(x.double(), S.project(c.double()), atol=1e-4)
