"""Correct on any input: leaves matched by key, uniform and validated options, explicit checkpointable
state, clear errors for mixed dtypes, warnings for NaN losses and reused batches, autocast (float64
unless stated)."""
import io
import math
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import linear_solvers as ls
from bilevel import pytree as pt
from bilevel.estimators import EstimatorState
from bilevel.testing import QuadraticBilevel, relative_error

D = torch.float64
EPS = torch.finfo(D).eps


# -- leaves matched by key --------------------------------------------------------------------------
def _diag_reversed(n=5):
    """``H = diag(1..n)`` on ``{"a0": (), ..., "a{n-1}": ()}`` whose matvec lists its keys reversed."""
    keys = [f"a{i}" for i in range(n)]
    d = {k: torch.tensor(float(i + 1), dtype=D) for i, k in enumerate(keys)}

    def matvec(v):
        return {k: d[k] * v[k] for k in reversed(keys)}
    b = {k: torch.tensor(1.0, dtype=D) for k in keys}
    return matvec, b, torch.tensor([1.0 / (i + 1) for i in range(n)], dtype=D)


def test_issue_reproduction_reversed_matvec_keys():
    matvec, b, want = _diag_reversed()
    v, info = ls.conjugate_gradient(matvec, b, tol=1e-14, maxiter=10)
    torch.testing.assert_close(pt.flatten(v), want, rtol=0, atol=1e-12)     # was [1/3]*5
    v, info = ls.dense_solve(matvec, b)
    torch.testing.assert_close(pt.flatten(v), want, rtol=0, atol=1e-12)     # was wrong, residual 0.0
    assert info.residual < 1e-14


def _shuffled(tree, rnd):
    keys = list(tree)
    rnd.shuffle(keys)
    return {k: tree[k] for k in keys}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_leaves=st.integers(1, 6), flat=st.booleans())
def test_every_linear_solver_matches_leaves_by_key(seed, n_leaves, flat):
    # SPD H = A Aᵀ + I on a pytree of n_leaves leaves; matvec returns its keys in a random order.
    # CG (leaf-wise and flat), Neumann, fixed point, dense: against torch.linalg.solve.
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    sizes = [int(s) for s in torch.randint(1, 4, (n_leaves,), generator=gen)]
    like = {f"k{i}": torch.zeros(s, dtype=D) for i, s in enumerate(sizes)}
    n = sum(sizes)
    A = torch.randn(n, n, generator=gen, dtype=D) / math.sqrt(n)
    H = A @ A.T + torch.eye(n, dtype=D)
    b = pt.unflatten(torch.randn(n, generator=gen, dtype=D), like)

    def matvec(v):
        return _shuffled(pt.unflatten(H @ pt.flatten(v, like=like), like), rnd)
    want = torch.linalg.solve(H, pt.flatten(b))
    L = float(torch.linalg.eigvalsh(H).max())
    scale = float(want.norm())
    v, _ = ls.conjugate_gradient(matvec, _shuffled(b, rnd), tol=1e-13, maxiter=4 * n,
                                 flat_max=(1 << 20) if flat else 0)
    assert float((pt.flatten(v, like=like) - want).norm()) <= 1e-9 * scale
    v, _ = ls.dense_solve(matvec, _shuffled(b, rnd))
    assert float((pt.flatten(v, like=like) - want).norm()) <= 1e-10 * scale
    # Richardson / Neumann with η = 1/L: error (1 − μ/L)^K with μ ≥ 1, L ≤ 1 + ‖A‖² — K = 400 suffices
    # for L ≤ ~20 to reach (1 − 1/20)^400 ≈ 1e-9.
    K = 400
    bound = (1 - 1 / L) ** K * scale * 1.01 + 1e-12 * scale
    v, _ = ls.neumann_series(matvec, _shuffled(b, rnd), eta=1 / L, terms=K)
    assert float((pt.flatten(v, like=like) - want).norm()) <= bound
    v, _ = ls.fixed_point(matvec, _shuffled(b, rnd), eta=1 / L, tol=0.0, maxiter=K)
    assert float((pt.flatten(v, like=like) - want).norm()) <= bound


ESTIMATORS = [("exact", {}), ("cg", {"tol": 1e-12, "maxiter": 200}),
              ("neumann", {"eta": 0.05, "terms": 800}),
              ("fixed-point", {"eta": 0.05, "tol": 1e-12, "maxiter": 4000}),
              ("unrolled", {"lr": 0.05, "steps": 800}),
              ("stochastic-neumann", {"eta": 0.05, "terms": 800, "mode": "stocbio", "seed": 0})]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), order_seed=st.integers(0, 1000))
@pytest.mark.parametrize("name,opts", ESTIMATORS)
@pytest.mark.filterwarnings("ignore:stochastic-neumann got a single lower batch")
def test_every_estimator_matches_leaves_by_key(name, opts, seed, order_seed):
    # x and y handed over in shuffled key order: the result is keyed like x and equals the closed form.
    # κ = 10, μ = 1 ⇒ L = 10, η = 0.05: tail (1 − 0.05)^800 ≈ 1e-18; CG/exact to rounding.
    rnd = random.Random(order_seed)
    q = QuadraticBilevel.random(5, 7, kappa=10, mu=1.0, x_parts=3, y_parts=4, seed=seed)
    x = q.random_x()
    y = q.y_star(x)
    xs, ys = _shuffled(x, rnd), _shuffled(y, rnd)
    res = bilevel.estimators.get(name, **opts)(q.problem(), xs, ys, None, None)
    assert list(res.grad) == list(xs)
    assert relative_error({k: res.grad[k] for k in q.x_shapes}, q.hypergradient(x), q.scale(x)) <= 1e-8


def test_forward_over_reverse_mixed_product_is_a_jvp(monkeypatch):
    # The forward-over-reverse mixed product must use forward mode (jvp), not a vjp (double backward),
    # and agree with the reverse-over-reverse product.
    q = QuadraticBilevel.random(4, 5, kappa=10, seed=0, x_parts=2, y_parts=2)
    x = q.random_x()
    y = q.y_star(x)
    v = pt.unflatten(torch.randn(5, dtype=D), y)
    ref = q.problem().operators(x, y, None, "reverse-over-reverse").mixed(v)
    import bilevel.problem as bp
    calls = []
    real = bp.jvp

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(bp, "jvp", spy)
    out = q.problem().operators(x, y, None, "forward-over-reverse").mixed(_shuffled(v, random.Random(1)))
    assert calls
    torch.testing.assert_close(pt.flatten(out, like=x), pt.flatten(ref, like=x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pt.flatten(ref, like=x), q.C.T @ pt.flatten(v), rtol=1e-12, atol=1e-12)


# -- options: same names, validated, rejected where they do not apply ---------------------------------
BAD = [float("nan"), float("inf"), -float("inf"), True, "0.1"]


@pytest.mark.parametrize("name,option,bad", [
    (n, o, b) for n, o in [("exact", "damping"), ("cg", "damping"), ("cg", "tol"), ("neumann", "eta"),
                           ("neumann", "damping"), ("fixed-point", "eta"), ("fixed-point", "tol"),
                           ("fixed-point", "damping"), ("stochastic-neumann", "eta"),
                           ("stochastic-neumann", "damping"), ("unrolled", "lr"),
                           ("unrolled", "damping")] for b in BAD])
def test_numeric_options_must_be_finite(name, option, bad):
    with pytest.raises(ValueError, match=f"{option} must be .*got {bad!r}".replace("(", r"\(")
                       .replace(")", r"\)")):
        bilevel.estimators.get(name, **{option: bad})


@pytest.mark.parametrize("name,option,bad", [
    ("cg", "maxiter", -1), ("cg", "maxiter", 2.5), ("neumann", "terms", 0), ("cg", "check_every", 0),
    ("neumann", "eta", 0.0), ("cg", "damping", -1e-3), ("unrolled", "steps", 0),
    ("stochastic-neumann", "terms", 0), ("exact", "max_dim", 0), ("cg", "warm_start", 1)])
def test_options_out_of_range(name, option, bad):
    with pytest.raises(ValueError, match=option):
        bilevel.estimators.get(name, **{option: bad})


def test_linear_solver_options_must_be_finite():
    matvec, b, _ = _diag_reversed(3)
    for call in (lambda: ls.conjugate_gradient(matvec, b, tol=float("nan")),
                 lambda: ls.neumann_series(matvec, b, eta=float("nan"), terms=3),
                 lambda: ls.fixed_point(matvec, b, eta=float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            call()
    with pytest.raises(ValueError, match="lr must be > 0"):
        bilevel.LowerSolver(QuadraticBilevel.random(2, 2).problem(), lr=float("nan"))


def test_damping_everywhere_it_applies_and_rejected_where_not():
    # Every estimator that solves with ∂²_yy g takes damping=λ and converges to the damped
    # hypergradient ∂_x f − Cᵀ (H + λI)⁻¹ ∂_y f; first-order refuses it and says why.
    q = QuadraticBilevel.random(4, 6, kappa=10, mu=1.0, seed=2, x_parts=2, y_parts=2)
    x = q.random_x()
    y = q.y_star(x)
    lam = 0.5
    Hl = q.H + lam * torch.eye(6, dtype=D)
    ref = q.grad_x_f(x, y) - q.C.T @ torch.linalg.solve(Hl, q.grad_y_f(x, y))
    # η = 0.05 ≤ 1/(L + λ) = 1/10.5; (1 − 0.05·1.5)^1000 ≈ 1e-34.
    opts = {"exact": {}, "cg": {"tol": 1e-13, "maxiter": 100}, "neumann": {"eta": 0.05, "terms": 1000},
            "fixed-point": {"eta": 0.05, "tol": 1e-13, "maxiter": 3000},
            "stochastic-neumann": {"eta": 0.05, "terms": 1000, "mode": "stocbio", "seed": 0},
            "unrolled": {"lr": 0.05, "steps": 1000}}
    for name, o in opts.items():
        stream = iter(lambda: None, 1)     # endless iterator of the (deterministic) batch None
        res = bilevel.estimators.get(name, damping=lam, **o)(q.problem(), x, y, None, stream)
        assert relative_error(res.grad, ref, q.scale(x)) <= 1e-9, name
        assert res.info.extra.get("damping") == lam, name
    with pytest.raises(TypeError, match=r"first-order.*\['damping'\].*solves none"):
        bilevel.estimators.get("first-order", damping=0.1)


def test_single_batch_to_a_stochastic_estimator_warns():
    q = QuadraticBilevel.random(2, 3, seed=0)
    x = q.random_x()
    est = bilevel.estimators.get("stochastic-neumann", terms=5, seed=0)
    with pytest.warns(UserWarning, match="single lower batch.*BatchStream"):
        est(q.problem(), x, q.y_star(x), None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est(q.problem(), x, q.y_star(x), None, iter(lambda: None, 1))


# -- explicit, checkpointable state -------------------------------------------------------------------
def _roundtrip(state: EstimatorState) -> EstimatorState:
    """Through torch.save / torch.load(weights_only=True): plain tensors and ints, no pickled classes."""
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    return EstimatorState.from_dict(torch.load(buf, weights_only=True))


def test_cg_warm_start_through_explicit_state_and_checkpoint():
    q = QuadraticBilevel.random(5, 30, kappa=100, seed=3, y_parts=2)
    x = q.random_x()
    y = q.y_star(x)
    est = bilevel.estimators.get("cg", tol=1e-10, maxiter=200, warm_start=True, materialize="never")
    s0 = est.init(x, y)
    assert s0.warm is None and s0.step == 0
    r1 = est(q.problem(), x, y, None, None, state=s0)
    assert r1.state.step == 1 and set(r1.state.warm) == set(y)
    s1 = _roundtrip(r1.state)
    r2 = est(q.problem(), x, y, None, None, state=s1)
    assert r2.info.hvp_count < r1.info.hvp_count           # warm start from the restored state
    # a fresh estimator resumed from the checkpoint does exactly what the original does
    r2b = bilevel.estimators.get("cg", tol=1e-10, maxiter=200, warm_start=True, materialize="never")(
        q.problem(), x, y, None, None, state=s1)
    assert torch.equal(pt.flatten(r2.grad), pt.flatten(r2b.grad))
    # the implicit (old) call signature still warm-starts across calls
    est2 = bilevel.estimators.get("cg", tol=1e-10, maxiter=200, warm_start=True, materialize="never")
    a = est2(q.problem(), x, y, None, None)
    b = est2(q.problem(), x, y, None, None)
    assert b.info.hvp_count < a.info.hvp_count


def test_stochastic_neumann_resumes_its_random_stream_exactly():
    q = QuadraticBilevel.random(3, 4, kappa=5, seed=1)
    x = q.random_x()
    y = q.y_star(x)
    est = bilevel.estimators.get("stochastic-neumann", terms=30, seed=7)
    stream = iter(lambda: None, 1)
    state = est.init(x, y)
    ks = []
    for _ in range(6):
        res = est(q.problem(), x, y, None, stream, state=state)
        state = res.state
        ks.append(res.info.extra["K"])
        if len(ks) == 3:
            saved = _roundtrip(state)
    resumed = bilevel.estimators.get("stochastic-neumann", terms=30, seed=123)   # other seed: state wins
    ks2 = []
    for _ in range(3):
        res = resumed(q.problem(), x, y, None, stream, state=saved)
        saved = res.state
        ks2.append(res.info.extra["K"])
    assert ks2 == ks[3:] and len(set(ks)) > 1


def test_state_errors():
    with pytest.raises(ValueError, match="unknown EstimatorState fields"):
        EstimatorState.from_dict({"step": 0, "generator": 1})
    with pytest.raises(TypeError, match="uint8"):
        EstimatorState.from_dict({"rng": [1, 2]})
    q = QuadraticBilevel.random(2, 2)
    x = q.random_x()
    with pytest.raises(TypeError, match="state must be"):
        bilevel.estimators.get("cg")(q.problem(), x, q.y_star(x), None, None, state={"step": 0})


# -- non-finite losses and mixed dtypes ---------------------------------------------------------------
def _nan_problem(where):
    def lower(x, y, b):
        v = 0.5 * (y["y"] ** 2).sum() - (x["x"] * y["y"]).sum()
        return v * float("nan") if where == "lower" else v

    def upper(x, y, b):
        v = ((y["y"] - 1) ** 2).sum()
        return v * float("nan") if where == "upper" else v
    return bilevel.BilevelProblem(upper, lower)


@pytest.mark.parametrize("where", ["upper", "lower"])
@pytest.mark.parametrize("name", ["exact", "cg", "neumann", "first-order", "unrolled"])
def test_nan_loss_warns_and_is_reported(where, name):
    x, y = {"x": torch.ones(3, dtype=D)}, {"y": torch.ones(3, dtype=D)}
    res = None
    if name == "first-order" and where == "lower":
        pytest.skip("first-order never evaluates the lower loss")
    with pytest.warns(RuntimeWarning, match=f"{where} loss .* is nan"):
        res = bilevel.estimators.get(name)(_nan_problem(where), x, y, None, None)
    assert res.info.finite is False
    rep = res.info.extra["nonfinite"]
    assert math.isnan(rep[f"{where}_loss"])
    assert rep["grad_keys"] == ([] if name == "first-order" else ["x"])   # ∂_x f = 0 there


def test_finite_result_reports_finite():
    q = QuadraticBilevel.random(2, 3)
    x = q.random_x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bilevel.estimators.get("cg")(q.problem(), x, q.y_star(x), None, None).info.finite


def test_mixed_dtypes_give_a_clear_error():
    q = QuadraticBilevel.random(3, 4, seed=0, y_parts=2)
    x = q.random_x()
    y = {k: v.float() for k, v in q.y_star(x).items()}
    with pytest.raises(TypeError, match=r"mix dtypes.*torch.float64: x\['x0'\].*torch.float32: y\['y0'\]"
                                        r".*\.to\(torch.float64\)"):
        bilevel.estimators.get("cg")(q.problem(), x, y, None, None)
    with pytest.raises(TypeError, match=r"x\['x0'\] has dtype torch.int64"):
        bilevel.estimators.get("cg")(q.problem(), {"x0": torch.ones(3, dtype=torch.long)},
                                     q.y_star(x), None, None)


# -- autocast -----------------------------------------------------------------------------------------
def test_cg_under_bf16_autocast_solves_in_float32():
    # A float32 ridge lower level whose loss uses matmuls (bf16 under CPU autocast). The solve must run
    # in float32: the result agrees with the float32 result outside autocast to float32 CG accuracy
    # (products in bf16 carry relative errors ~4e-3, far above the 1e-4 allowed here). The upper loss is
    # elementwise (float32 under autocast), so any difference comes from the solve alone.
    gen = torch.Generator().manual_seed(0)
    n, d = 256, 48
    A = torch.randn(n, d, generator=gen) * torch.logspace(0, 1, d)
    t = torch.randn(n, generator=gen)
    c = torch.randn(d, generator=gen)

    def lower(x, y, b):
        return ((A @ y["w"] - t) ** 2).mean() + torch.exp(x["l"]) * (y["w"] ** 2).sum()

    def upper(x, y, b):
        return ((y["w"] - c) ** 2).sum()
    problem = bilevel.BilevelProblem(upper, lower)
    x = {"l": torch.tensor(-1.0)}
    y = {"w": torch.linalg.solve(2 * A.T @ A / n + 2 * math.exp(-1.0) * torch.eye(d), 2 * A.T @ t / n)}
    est = bilevel.estimators.get("cg", tol=1e-6, maxiter=200)
    ref = est(problem, x, y, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (A @ y["w"]).dtype == torch.bfloat16          # autocast is really on
        res = est(problem, x, y, None, None)
    assert res.info.residual <= 1e-6 and res.info.extra["autocast"] == "torch.bfloat16"
    assert res.grad["l"].dtype == torch.float32
    torch.testing.assert_close(res.grad["l"], ref.grad["l"], rtol=1e-4, atol=0)


# -- materialising small Hessians ---------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [("cg", dict(tol=0.0, maxiter=25)), ("cg", dict(tol=1e-12, maxiter=60)),
                                       ("neumann", dict(eta=0.05, terms=40)),
                                       ("fixed-point", dict(eta=0.05, tol=0.0, maxiter=30))])
def test_materialized_solve_runs_the_same_iterations(name, opts):
    # Building H densely changes only how products are computed: the same iterates up to rounding
    # (relative 1e-10 after ≤ 60 iterations at κ = 10), and info says so.
    q = QuadraticBilevel.random(4, 30, kappa=10, mu=1.0, x_parts=2, y_parts=3, seed=9)
    x = q.random_x()
    y = q.y_star(x)
    a = bilevel.estimators.get(name, materialize="never", **opts)(q.problem(), x, y, None, None)
    b = bilevel.estimators.get(name, materialize="always", **opts)(q.problem(), x, y, None, None)
    assert "materialized" not in a.info.extra and b.info.extra["materialized"] is True
    assert b.info.hvp_count == 30 and a.info.iterations == b.info.iterations
    assert relative_error(b.grad, pt.flatten(a.grad, like=x), q.scale(x)) <= 1e-10


def test_materialize_auto_follows_the_expected_product_count():
    q = QuadraticBilevel.random(3, 40, kappa=10, seed=1)
    x = q.random_x()
    y = q.y_star(x)

    def mat(est, state=None):
        return est(q.problem(), x, y, None, None, state=state).info.extra.get("materialized", False)
    assert mat(bilevel.estimators.get("cg", tol=0.0, maxiter=20))          # 2·20 ≥ 40
    assert not mat(bilevel.estimators.get("cg", tol=0.0, maxiter=19))      # 2·19 < 40
    assert not mat(bilevel.estimators.get("neumann", terms=20))            # 19 products
    est = bilevel.estimators.get("cg", tol=1e-10, maxiter=100, warm_start=True)
    s = est.init(x, y)
    assert mat(est, s)                                                      # first call: maxiter
    assert not mat(est, EstimatorState(step=1, iterations=3))               # last call took 3
    assert mat(est, EstimatorState(step=1, iterations=20))
    big = QuadraticBilevel.random(2, 513, kappa=2, seed=0)                  # above MATERIALIZE_MAX
    xb = big.random_x()
    assert "materialized" not in bilevel.estimators.get("cg", tol=0.0, maxiter=600)(
        big.problem(), xb, big.y_star(xb), None, None).info.extra
    with pytest.raises(ValueError, match="materialize='sometimes'"):
        bilevel.estimators.get("cg", materialize="sometimes")
