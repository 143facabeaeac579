"""Feasible sets of bilevel.frank_wolfe: LMO against scipy's linprog and against vertex enumeration,
the sort-based projection against its variational inequality, and input validation (float64)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from bilevel import frank_wolfe as fw

F64 = torch.float64


# ---- strategies --------------------------------------------------------------------------------
@st.composite
def floored(draw, max_dim=7):
    dim = draw(st.integers(1, max_dim))
    return fw.FlooredSimplex(dim, draw(st.floats(1e-3, 1e3)), draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.5, 10.0])))


@st.composite
def feasible_sets(draw, max_dim=7):
    kind = draw(st.sampled_from(["floored", "prob", "l1", "box", "product"]))
    if kind == "floored":
        return draw(floored(max_dim))
    dim = draw(st.integers(1, max_dim))
    if kind == "prob":
        return fw.ProbabilitySimplex(dim)
    if kind == "l1":
        return fw.L1Ball(dim, draw(st.floats(1e-3, 1e3)))
    if kind == "box":
        lo = draw(st.lists(st.floats(-1e3, 1e3), min_size=dim, max_size=dim))
        width = draw(st.lists(st.floats(1e-3, 1e3), min_size=dim, max_size=dim))
        return fw.Box(lo, [a + b for a, b in zip(lo, width)])
    n = draw(st.integers(1, 4))
    return fw.ProductSet([draw(floored(4)) for _ in range(n)])


@st.composite
def gradients(draw, dim):
    """Random, all-positive, all-negative, tied and wide-range (1e-6..1e6) gradients."""
    kind = draw(st.sampled_from(["random", "positive", "negative", "ties", "zero"]))
    if kind == "zero":
        return torch.zeros(dim, dtype=F64)
    if kind == "ties":
        vals = draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0]), min_size=dim, max_size=dim))
        scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
        return torch.tensor(vals, dtype=F64) * scale
    mags = draw(st.lists(st.floats(-6, 6), min_size=dim, max_size=dim))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=dim, max_size=dim))
    g = torch.tensor([s * 10 ** m for s, m in zip(signs, mags)], dtype=F64)
    if kind == "positive":
        g = g.abs()
    elif kind == "negative":
        g = -g.abs()
    return g


# ---- linprog reference -------------------------------------------------------------------------
def linprog_value(S, g):
    """min g^T x over S by scipy's HiGHS, from the set's public parameters only."""
    g = g.numpy()
    d = S.dim
    if isinstance(S, fw.FlooredSimplex):
        r = linprog(g, A_ub=np.ones((1, d)), b_ub=[S.tau + d * S.eps], bounds=[(S.eps, None)] * d)
    elif isinstance(S, fw.ProbabilitySimplex):
        r = linprog(g, A_eq=np.ones((1, d)), b_eq=[1.0], bounds=[(0, None)] * d)
    elif isinstance(S, fw.L1Ball):   # x = p - m, p, m >= 0, sum(p + m) <= r
        r = linprog(np.concatenate([g, -g]), A_ub=np.ones((1, 2 * d)), b_ub=[S.radius], bounds=[(0, None)] * 2 * d)
    elif isinstance(S, fw.Box):
        r = linprog(g, bounds=list(zip(S.lower.tolist(), S.upper.tolist())))
    elif isinstance(S, fw.ProductSet):
        A = np.zeros((len(S.blocks), d))
        b, bounds = [], []
        for k, (blk, sl) in enumerate(zip(S.blocks, S.block_slices())):
            A[k, sl] = 1
            b.append(blk.tau + blk.dim * blk.eps)
            bounds += [(blk.eps, None)] * blk.dim
        r = linprog(g, A_ub=A, b_ub=b, bounds=bounds)
    else:  # pragma: no cover
        raise AssertionError(S)
    assert r.status == 0, r.message
    return r.fun


def scale_of(S, g):
    """|g^T v| <= ||g||_1 * max_v ||v||_inf: the scale of LMO values (for relative tolerances)."""
    V = S.vertices()
    return float(g.abs().sum() * V.abs().max()) + 1e-300


@given(st.data())
def test_lmo_matches_linprog_and_vertex_enumeration(data):
    S = data.draw(feasible_sets())
    g = data.draw(gradients(S.dim))
    v = S.lmo(g)
    V = S.vertices()
    # v is one of the enumerated vertices (bit for bit) ...
    assert bool((V == v).all(1).any()), (S, g, v)
    # ... attaining the enumerated minimum (same arithmetic up to summation order: 1e-12 relative)
    scale = scale_of(S, g)
    assert float(g @ v) <= float((V @ g).min()) + 1e-12 * scale
    # HiGHS solves to primal/dual feasibility 1e-7: its value may differ by that, relative to the scale
    lp = linprog_value(S, g)
    assert abs(float(g @ v) - lp) <= 1e-7 * scale, (S, g, float(g @ v), lp)


@given(st.data())
def test_lmo_tie_breaking_prefers_floor_vertex(data):
    S = data.draw(floored())
    g = data.draw(gradients(S.dim))
    v = S.lmo(g)
    eps = torch.full((S.dim,), S.eps, dtype=F64)
    if bool((g >= 0).all()):                  # the paper: v_0 = eps*1 if all entries are >= 0
        assert torch.equal(v, eps)
    else:                                      # else eps*1 + tau*e_i, i = first argmin
        i = int(torch.argmin(g))
        e = eps.clone()
        e[i] += S.tau
        assert torch.equal(v, e)


def test_product_lmo_is_one_vectorised_call_per_block():
    """500 blocks of uneven sizes: the product LMO equals the per-block LMOs concatenated."""
    torch.manual_seed(0)
    sizes = torch.randint(1, 9, (500,)).tolist()
    blocks = [fw.FlooredSimplex(r, 1.0 + (i % 3), 1e-3 * (1 + i % 2)) for i, r in enumerate(sizes)]
    P = fw.ProductSet(blocks)
    g = torch.randn(P.dim, dtype=F64)
    g[:40] = torch.rand(40, dtype=F64)                    # some all-positive blocks
    ref = torch.cat([b.lmo(g[sl]) for b, sl in zip(blocks, P.block_slices())])
    assert torch.equal(P.lmo(g), ref)
    uniform = fw.ProductSet([fw.FlooredSimplex(4, 2.0, 0.01)] * 500)      # the view(B, r) path
    g = torch.randn(uniform.dim, dtype=F64)
    ref = torch.cat([b.lmo(g[sl]) for b, sl in zip(uniform.blocks, uniform.block_slices())])
    assert torch.equal(uniform.lmo(g), ref)


@settings(max_examples=40)
@given(st.data())
def test_projection_satisfies_variational_inequality(data):
    """p = P_S(c) iff p in S and <c - p, v - p> <= 0 for every vertex v (S a polytope)."""
    S = data.draw(feasible_sets(max_dim=6))
    c = data.draw(gradients(S.dim)) * data.draw(st.sampled_from([1e-6, 1e-3, 1.0]))
    p = S.project(c)
    assert S.contains(p, atol=1e-9 * (1 + float(c.abs().max())))
    V = S.vertices()
    slack = (V - p) @ (c - p)
    scale = float((V - p).abs().max() * ((c - p).abs().sum() + 1))
    assert float(slack.max()) <= 1e-9 * scale


def test_projection_of_interior_point_is_identity_and_floored_projection_by_sort():
    S = fw.FlooredSimplex(4, 1.0, 0.1)
    x = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=F64)
    assert torch.allclose(S.project(x), x, atol=1e-15)
    # budget active: u = c - eps = [1, 1, 0.4, -1] -> threshold 0.5 -> [0.5, 0.5, 0, 0] + eps
    c = torch.tensor([1.1, 1.1, 0.5, -0.9], dtype=F64)
    assert torch.allclose(S.project(c), torch.tensor([0.6, 0.6, 0.1, 0.1], dtype=F64), atol=1e-15)


def test_vertices_and_atoms_of_floored_simplex():
    S = fw.FlooredSimplex(3, 2.0, 0.5)
    V = S.vertices()
    assert V.tolist() == [[0.5, 0.5, 0.5], [2.5, 0.5, 0.5], [0.5, 2.5, 0.5], [0.5, 0.5, 2.5]]
    A = S.atoms()                      # weights layout (w_1, w_2, w_3, w_0)
    assert A.tolist() == V[[1, 2, 3, 0]].tolist()
    assert fw.Box([0, 0], [1, 2]).vertices().shape == (4, 2)
    assert fw.L1Ball(3, 1.0).vertices().shape == (6, 3)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: fw.FlooredSimplex(3, 0.0, 0.1), r"tau must be > 0, got 0\.0"),
    (lambda: fw.FlooredSimplex(3, -1.0, 0.1), r"tau must be > 0, got -1\.0"),
    (lambda: fw.FlooredSimplex(3, 1.0, -0.01), r"eps must be >= 0, got -0\.01"),
    (lambda: fw.FlooredSimplex(0, 1.0, 0.1), r"dim must be >= 1, got 0"),
    (lambda: fw.FlooredSimplex(3, float("nan"), 0.1), r"tau must be finite, got nan"),
    (lambda: fw.ProbabilitySimplex(0), r"dim must be >= 1, got 0"),
    (lambda: fw.L1Ball(2, 0.0), r"radius must be > 0, got 0\.0"),
    (lambda: fw.Box([0.0, 1.0], [1.0, 1.0]), r"lower\[1\] = 1\.0 >= upper\[1\] = 1\.0"),
    (lambda: fw.Box([], []), r"must be >= 1, got 0"),
    (lambda: fw.ProductSet([]), r"at least one block"),
])
def test_bad_set_parameters_raise_valueerror_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_raise_typeerror():
    with pytest.raises(TypeError, match=r"dim must be a positive int, got 2\.5"):
        fw.FlooredSimplex(2.5, 1.0, 0.1)
    with pytest.raises(TypeError, match=r"ProductSet block 1 is a str"):
        fw.ProductSet([fw.FlooredSimplex(2, 1.0, 0.1), "layer"])


def test_lmo_rejects_bad_gradients():
    S = fw.FlooredSimplex(3, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"grad has shape \(4,\), expected \(3,\)"):
        S.lmo(torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match=r"grad\[1\] = nan"):
        S.lmo(torch.tensor([0.0, float("nan"), 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"grad\[2\] = -inf"):
        S.lmo(torch.tensor([0.0, 1.0, -float("inf")], dtype=F64))
