"""Truncation (dEBORA removes dead ranks): removing coordinates at their floor from the set, the iterate,
the barycentric weights and the step-rule state keeps every invariant (float64)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel import frank_wolfe as fw

F64 = torch.float64
SOLVERS = [fw.VanillaFW, fw.AwayStepFW, fw.PairwiseFW]


def invariants(state, tol=1e-12):
    S, x, w = state.set, state.x, state.weights
    L = S.layout(F64)
    assert x.shape == (S.dim,) and w.shape == (L.n_atoms,)
    assert S.feasibility_error(x, atol=tol) is None
    assert bool((w >= 0).all()) and bool((w[~L.atom_exists] == 0).all())
    sums = torch.zeros(L.B, dtype=F64).index_add_(0, L.atom_block, w)
    assert float((sums - 1).abs().max()) <= tol
    assert float((S.atoms(F64).T @ w - x).abs().max()) <= tol * max(1.0, float(L.scale.max()))


def sparse_run(solver, S, c, steps=80, rule=None):
    opt = solver(S, step=rule or fw.ShortStep(lipschitz=1.0))
    state = opt.init(S.lmo(torch.zeros(S.dim, dtype=F64)))
    for _ in range(steps):
        _, state, _ = opt.step(state.x - c, state)
    return opt, state


def removable(opt, state):
    """Coordinates at the floor, keeping the last coordinate of every atomic block."""
    mask = opt.at_floor(state).clone()
    L = state.set.layout(F64)
    for b in range(L.B):
        s, n = int(L.starts[b]), L.sizes[b]
        if bool(mask[s:s + n].all()):
            mask[s + n - 1] = False
    return torch.nonzero(mask).flatten()


@settings(max_examples=20)
@given(st.data())
def test_truncation_keeps_invariants_and_iterate(data):
    sizes = data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    tau = data.draw(st.sampled_from([0.5, 4.0, 16.0]))
    eps = data.draw(st.sampled_from([0.0, 1e-3, 0.1]))
    S = fw.ProductSet([fw.FlooredSimplex(r, tau, eps) for r in sizes]) if len(sizes) > 1 else \
        fw.FlooredSimplex(sizes[0], tau, eps)
    solver = data.draw(st.sampled_from(SOLVERS))
    rule = data.draw(st.sampled_from([fw.ShortStep(lipschitz=1.0), fw.ShortStep(), fw.OpenLoop()]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    c = torch.randn(S.dim, dtype=F64, generator=gen) * tau
    opt, state = sparse_run(solver, S, c, steps=data.draw(st.integers(0, 60)), rule=rule)
    idx = removable(opt, state)
    idx = idx[torch.randperm(idx.numel(), generator=gen)]      # any order, spanning blocks
    new = opt.remove_coordinates(state, idx)
    keep = torch.ones(S.dim, dtype=torch.bool)
    keep[idx] = False
    invariants(new)
    assert new.set.dim == S.dim - idx.numel() and new.n == state.n
    assert torch.equal(new.x, state.x[keep])                  # the remaining coordinates are unchanged
    # the new set is the same kind of set with the same tau and eps per block
    blocks = new.set.blocks if isinstance(new.set, fw.ProductSet) else [new.set]
    assert all(b.tau == tau and b.eps == eps for b in blocks)
    # keep optimising on the reduced problem: still feasible, still exact weights
    for _ in range(20):
        _, new, _ = opt.step(new.x - c[keep], new)
    invariants(new)


def test_truncation_then_convergence_to_the_restricted_optimum():
    S = fw.FlooredSimplex(10, 1.0, 0.01)
    c = torch.tensor([0.5, -1, 0.4, -1, -1, 0.3, -1, -1, -1, -1], dtype=F64)
    opt, state = sparse_run(fw.AwayStepFW, S, c, steps=100)
    dead = torch.nonzero(opt.at_floor(state)).flatten()
    assert dead.tolist() == [1, 3, 4, 6, 7, 8, 9]
    new = opt.remove_coordinates(state, dead)
    assert new.set.dim == 3 and new.weights.shape == (4,)
    assert torch.equal(new.x, state.x[[0, 2, 5]])
    alive = torch.tensor([0, 2, 5])
    for _ in range(50):
        _, new, info = opt.step(new.x - c[alive], new)
    assert torch.allclose(new.x, S.project(c)[alive], atol=1e-12)
    # equivalently, a caller that truncated on its own restarts on the smaller set
    fresh = opt.init(new.x, feasible_set=fw.FlooredSimplex(3, 1.0, 0.01))
    assert torch.equal(fresh.x, new.x) and fresh.set.dim == 3


def test_truncation_spanning_blocks_with_uneven_sizes_and_secant_rule_state():
    P = fw.ProductSet([fw.FlooredSimplex(5, 1.0, 0.01), fw.FlooredSimplex(2, 1.0, 0.01),
                       fw.FlooredSimplex(4, 2.0, 0.02)])
    c = torch.tensor([0.6, -1, 0.4, -1, -1, 0.5, -1, 1.5, -1, -1, 0.7], dtype=F64)
    opt, state = sparse_run(fw.AwayStepFW, P, c, steps=60, rule=fw.ShortStep())
    idx = torch.tensor([9, 1, 3, 6, 8])
    new = opt.remove_coordinates(state, idx)
    assert [b.dim for b in new.set.blocks] == [3, 1, 2]
    assert new.rule_state.prev_x.shape == (6,) and new.rule_state.prev_grad.shape == (6,)
    invariants(new)
    keep = torch.tensor([0, 2, 4, 5, 7, 10])
    _, new, _ = opt.step(new.x - c[keep], new)
    invariants(new)


def test_truncation_refuses_coordinates_above_the_floor_and_emptied_blocks():
    P = fw.ProductSet([fw.FlooredSimplex(3, 1.0, 0.01), fw.FlooredSimplex(2, 1.0, 0.01)])
    opt = fw.AwayStepFW(P, step=fw.ShortStep(lipschitz=1.0))
    state = opt.init(torch.tensor([0.51, 0.01, 0.01, 0.01, 0.01], dtype=F64))
    snap = (state.x.clone(), state.weights.clone())
    with pytest.raises(ValueError, match=r"coordinate 0 is not at its floor: x\[0\] = 0\.51, floor 0\.01"):
        opt.remove_coordinates(state, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"would empty block 1 \(coordinates 3\.\.4\)"):
        opt.remove_coordinates(state, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"coordinate index 5 is out of range for dim=5"):
        opt.remove_coordinates(state, torch.tensor([5]))
    with pytest.raises(TypeError, match=r"integer coordinate indices"):
        opt.remove_coordinates(state, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"cannot remove all 2 coordinates"):
        S = fw.FlooredSimplex(2, 1.0, 0.0)
        o = fw.AwayStepFW(S)
        o.remove_coordinates(o.init(torch.zeros(2, dtype=F64)), torch.tensor([0, 1]))
    assert torch.equal(state.x, snap[0]) and torch.equal(state.weights, snap[1])
    # the same rule on the sets themselves
    with pytest.raises(ValueError, match=r"would empty block 1"):
        P.remove_coordinates(torch.tensor([3, 4]))
    assert [b.dim for b in P.remove_coordinates(torch.tensor([0, 4])).blocks] == [2, 1]
    # a tiny leftover weight within atol moves to the floor vertex v_0; x stays exactly as it was
    x = torch.tensor([0.51, 0.01 + 1e-13, 0.01, 0.01, 0.01], dtype=F64)
    st2 = opt.init(x)
    with pytest.raises(ValueError, match="not at its floor"):
        opt.remove_coordinates(st2, torch.tensor([1]))
    new = opt.remove_coordinates(st2, torch.tensor([1]), atol=1e-12)
    assert torch.equal(new.x, x[[0, 2, 3, 4]]) and float(new.weights[:2].sum() + new.weights[-2]) == 1.0
    assert opt.remove_coordinates(state, torch.tensor([], dtype=torch.long)) is state


def test_truncation_of_other_sets():
    # Box: each coordinate is its own interval; removing some (not all) is allowed
    B = fw.Box([0.0, -1.0, 2.0], [1.0, 1.0, 3.0])
    opt = fw.AwayStepFW(B)
    state = opt.init(torch.tensor([0.0, 0.5, 2.0], dtype=F64))
    new = opt.remove_coordinates(state, torch.tensor([0, 2]))
    assert isinstance(new.set, fw.Box) and new.x.tolist() == [0.5]
    invariants(new)
    # L1 ball: x_i = 0 made of cancelling +-r e_i weights keeps x exactly
    Lb = fw.L1Ball(3, 2.0)
    opt = fw.PairwiseFW(Lb)
    w = torch.tensor([0.25, 0.2, 0.0, 0.25, 0.0, 0.3, 0.0], dtype=F64)  # plus | minus | origin(absent)
    state = fw.FWState(x=Lb.combine(w), set=Lb, weights=w)
    new = opt.remove_coordinates(state, torch.tensor([0]))
    assert torch.allclose(new.x, state.x[1:], atol=1e-15)
    invariants(new)
    # probability simplex
    Ps = fw.ProbabilitySimplex(3)
    opt = fw.AwayStepFW(Ps)
    new = opt.remove_coordinates(opt.init(torch.tensor([0.0, 0.25, 0.75], dtype=F64)), torch.tensor([0]))
    assert new.x.tolist() == [0.25, 0.75]
    invariants(new)


def test_at_floor_helpers_agree_after_drop_steps():
    S = fw.FlooredSimplex(8, 16.0, 1e-3)
    c = torch.linspace(-2, 4, 8, dtype=F64)
    opt, state = sparse_run(fw.AwayStepFW, S, c, steps=100)
    exact = opt.at_floor(state)
    assert torch.equal(exact, S.at_floor(state.x, atol=0.0))       # x_i == eps bit for bit
    assert torch.equal(exact, opt.at_floor(state, atol=1e-9))
    assert 0 < int(exact.sum()) < 8
