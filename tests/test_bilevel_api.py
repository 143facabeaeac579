"""Errors, HVP modes and their fallbacks, the registry, LowerSolver warm start, BatchStream."""
import itertools
import warnings

import pytest
import torch

import bilevel
from bilevel.testing import QuadraticBilevel

D = torch.float64


def _quad(seed=0):
    q = QuadraticBilevel.random(3, 5, kappa=10, seed=seed, y_parts=2)
    x = q.random_x()
    return q, x, q.y_star(x)


# -- clear errors -------------------------------------------------------------------------------------
def test_non_scalar_losses():
    q, x, y = _quad()
    bad_lower = bilevel.BilevelProblem(q.upper_loss, lambda x, y, b: q.vec_y(y) * 2)
    with pytest.raises(ValueError, match=r"lower_loss must return a scalar.*shape \(5,\).*\.mean\(\)"):
        bilevel.estimators.get("cg")(bad_lower, x, y, None, None)
    bad_upper = bilevel.BilevelProblem(lambda x, y, b: torch.stack([q.upper_loss(x, y)] * 2), q.lower_loss)
    with pytest.raises(ValueError, match="upper_loss must return a scalar"):
        bilevel.estimators.get("cg")(bad_upper, x, y, None, None)
    not_tensor = bilevel.BilevelProblem(q.upper_loss, lambda x, y, b: 1.0)
    with pytest.raises(TypeError, match="lower_loss must return a scalar torch.Tensor, got float"):
        bilevel.estimators.get("exact")(not_tensor, x, y, None, None)
    with pytest.raises(TypeError, match="upper_loss must be a callable"):
        bilevel.BilevelProblem(3, q.lower_loss)


def test_mismatched_pytrees():
    q, x, y = _quad()
    p = q.problem()
    est = bilevel.estimators.get("cg")
    missing = {k: v for k, v in list(y.items())[:1]}        # the loss also looks up 'y1'
    with pytest.raises(ValueError, match=r"lower_loss looked up the key 'y1'.*y \(keys \['y0'\]\)"):
        est(p, x, missing, None, None)
    with pytest.raises(ValueError, match=r"x and y share the keys \['x0'\]"):
        est(p, x, {**y, "x0": torch.zeros(1, dtype=D)}, None, None)
    with pytest.raises(TypeError, match=r"y must be a dict\[str, Tensor\], got Tensor"):
        est(p, x, q.vec_y(y), None, None)
    with pytest.raises(TypeError, match=r"x\['x0'\] must be a torch.Tensor, got list"):
        est(p, {"x0": [1.0]}, y, None, None)
    with pytest.raises(ValueError, match="x is an empty dict"):
        est(p, {}, y, None, None)
    with pytest.raises(ValueError, match="different keys"):
        bilevel.pytree.check_same_structure({"a": torch.ones(1)}, {"b": torch.ones(1)}, "u", "v")
    with pytest.raises(ValueError, match=r"u\['a'\] has shape \(1,\) but v\['a'\] has shape \(2,\)"):
        bilevel.pytree.check_same_structure({"a": torch.ones(1)}, {"a": torch.ones(2)}, "u", "v")
    with pytest.raises(TypeError, match="problem must be a bilevel.BilevelProblem"):
        est(q.lower_loss, x, y, None, None)


def test_lower_loss_that_ignores_y():
    q, x, y = _quad()
    p = bilevel.BilevelProblem(q.upper_loss, lambda x, y, b: (q.vec_x(x) ** 2).sum())
    with pytest.raises(ValueError, match="lower_loss does not depend on y"):
        bilevel.estimators.get("cg")(p, x, y, None, None)
    partial = bilevel.BilevelProblem(q.upper_loss, lambda x, y, b: (y["y0"] ** 2).sum() + x["x0"].sum())
    with pytest.raises(ValueError, match=r"does not depend on y\['y1'\].*singular"):
        bilevel.estimators.get("cg")(partial, x, y, None, None)


def test_unknown_estimator_lists_available():
    with pytest.raises(ValueError) as err:
        bilevel.estimators.get("newton")
    msg = str(err.value)
    assert "unknown estimator 'newton'" in msg
    for name in ("cg", "exact", "first-order", "fixed-point", "neumann", "stochastic-neumann", "unrolled"):
        assert name in msg
    if "debora-closed-form" not in bilevel.estimators.available():   # unless debora was imported
        with pytest.raises(ValueError, match="registered by `import debora`"):
            bilevel.estimators.get("debora-closed-form")
    with pytest.raises(TypeError, match="bad options for estimator 'cg'"):
        bilevel.estimators.get("cg", tolerance=1e-3)
    with pytest.raises(ValueError, match="hvp_mode='fast'"):
        bilevel.estimators.get("neumann", hvp_mode="fast")
    with pytest.raises(ValueError, match="eta must be > 0"):
        bilevel.estimators.get("neumann", eta=-1.0)
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        bilevel.estimators.get("unrolled", optimizer="lbfgs")


def test_registry_register_and_pass_through():
    class Zero(bilevel.estimators.Estimator):
        name = "zero-test"

        def estimate(self, problem, x, y, upper_batch, lower_batch):
            return {k: torch.zeros_like(v) for k, v in x.items()}, bilevel.estimators.EstimatorInfo()

    bilevel.estimators.register("zero-test", Zero)
    try:
        assert "zero-test" in bilevel.estimators.available()
        with pytest.raises(ValueError, match="already registered"):
            bilevel.estimators.register("zero-test", lambda: Zero())
        q, x, y = _quad()
        res = bilevel.estimators.get("zero-test")(q.problem(), x, y, None, None)
        assert all(float(v.abs().sum()) == 0 for v in res.grad.values()) and res.info.wall_time >= 0
        obj = Zero()
        assert bilevel.estimators.get(obj) is obj
        with pytest.raises(ValueError, match="options were given together with an estimator object"):
            bilevel.estimators.get(obj, tol=1)
    finally:
        bilevel.estimators._REGISTRY.pop("zero-test", None)


def test_dataloader_and_exhausted_iterator_errors():
    q, x, y = _quad()
    loader = torch.utils.data.DataLoader([torch.zeros(5, 5, dtype=D)] * 2, batch_size=None)
    with pytest.raises(TypeError, match="BatchStream"):
        bilevel.estimators.get("stochastic-neumann")(q.problem(), x, y, None, loader)
    with pytest.raises(ValueError, match="exhausted"):
        bilevel.estimators.get("stochastic-neumann", terms=50, seed=0, mode="stocbio")(
            q.problem(), x, y, None, iter([None, None]))


# -- HVP modes -----------------------------------------------------------------------------------------
def _nonlinear_problem():
    """A smooth non-quadratic lower loss: modes must agree on its Hessian and mixed products."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(7, 4, generator=gen, dtype=D)

    def lower(x, y, b):
        z = A @ y["w"] + x["s"] * y["c"]
        return torch.nn.functional.softplus(z).sum() + torch.logsumexp(y["w"] * x["s"][:4], 0) \
            + 0.5 * (y["w"] ** 2).sum() + 0.5 * (y["c"] ** 2).sum()

    def upper(x, y, b):
        return (y["w"].sin()).sum() + (x["s"] ** 2).sum() + y["c"].sum()
    x = {"s": torch.randn(7, generator=gen, dtype=D)}
    y = {"w": torch.randn(4, generator=gen, dtype=D), "c": torch.randn(7, generator=gen, dtype=D)}
    return bilevel.BilevelProblem(upper, lower), x, y


def _dense_hessians(problem, x, y):
    """∂²_yy g and ∂²_xy g by torch.autograd.functional.hessian on flattened inputs (a reference
    independent of LowerOperators)."""
    from bilevel import pytree as pt
    nx = pt.numel(x)

    def g_flat(z):
        return problem.g(pt.unflatten(z[:nx], x), pt.unflatten(z[nx:], y), None)
    Hfull = torch.autograd.functional.hessian(g_flat, torch.cat([pt.flatten(x), pt.flatten(y)]))
    return Hfull[nx:, nx:], Hfull[:nx, nx:]


def test_hvp_modes_agree_with_dense_hessian():
    from bilevel import pytree as pt
    problem, x, y = _nonlinear_problem()
    Hyy, Hxy = _dense_hessians(problem, x, y)
    v = {k: torch.randn_like(t) for k, t in y.items()}
    for mode in ("auto", "forward-over-reverse", "reverse-over-reverse"):
        ops = problem.operators(x, y, None, hvp_mode=mode)
        assert torch.allclose(pt.flatten(ops.hvp(v)), Hyy @ pt.flatten(v), rtol=1e-12, atol=1e-12)
        assert torch.allclose(pt.flatten(ops.mixed(v)), Hxy @ pt.flatten(v), rtol=1e-12, atol=1e-12)
        V = {k: torch.stack([t, 2 * t]) for k, t in v.items()}
        HV = ops.hvp_batched(V)
        assert torch.allclose(pt.flatten({k: t[1] for k, t in HV.items()}), 2 * Hyy @ pt.flatten(v),
                              rtol=1e-12, atol=1e-12)
        assert ops.hvp_count == 3 and ops.mixed_count == 1
    grads = [pt.flatten(bilevel.estimators.get("exact", hvp_mode=m)(problem, x, y, None, None).grad)
             for m in ("forward-over-reverse", "reverse-over-reverse")]
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-13)


class _CubeNoJvp(torch.autograd.Function):
    """y ↦ y³ with a (twice-differentiable) backward but no forward-mode rule."""

    @staticmethod
    def forward(t):
        return t ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out):
        (t,) = ctx.saved_tensors
        return grad_out * 3 * t ** 2


def _grid_sample_problem():
    """A lower loss through F.grid_sample (no forward-AD rule in torch; double backward exists)."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.rand(1, 3, 3, 2, generator=gen, dtype=D) * 2 - 1

    def lower(x, y, b):
        img = y["img"].reshape(1, 1, 4, 4)
        s = torch.nn.functional.grid_sample(img, grid, align_corners=True)
        return 0.5 * (s ** 2).sum() + 0.5 * (y["img"] ** 2).sum() + (x["a"] * y["img"]).sum() \
            + 0.25 * (_CubeNoJvp.apply(y["img"]) * y["img"]).sum()

    def upper(x, y, b):
        return (y["img"] ** 2).sum() + x["a"].sum()
    x = {"a": torch.randn(16, generator=gen, dtype=D)}
    y = {"img": torch.randn(16, generator=gen, dtype=D)}
    return lower, upper, x, y


def test_forward_over_reverse_falls_back_to_double_backward():
    from bilevel import pytree as pt
    lower, upper, x, y = _grid_sample_problem()
    with pytest.raises(Exception, match="(?i)forward"):   # the op really lacks a forward-mode rule
        torch.func.jvp(lambda t: torch.func.grad(lambda u: lower(x, {"img": u}, None))(t),
                       (y["img"],), (torch.ones(16, dtype=D),))
    problem = bilevel.BilevelProblem(upper, lower)
    Hyy, Hxy = _dense_hessians(problem, x, y)
    ops = problem.operators(x, y, None, hvp_mode="forward-over-reverse")
    v = {"img": torch.randn(16, dtype=D)}
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        hv = ops.hvp(v)
    assert problem._hvp_fallback
    assert torch.allclose(hv["img"], Hyy @ v["img"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(ops.mixed(v)["a"], Hxy @ v["img"], rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # remembered: no second warning, no second failed attempt
        ops.hvp(v)
    res = {m: bilevel.estimators.get("cg", hvp_mode=m, tol=1e-13)(bilevel.BilevelProblem(upper, lower),
                                                                   x, y, None, None)
           for m in ("auto", "reverse-over-reverse")}
    exact_v = torch.linalg.solve(Hyy, 2 * y["img"])
    expected = torch.ones(16, dtype=D) - Hxy @ exact_v
    for r in res.values():
        assert torch.allclose(r.grad["a"], expected, rtol=1e-10, atol=1e-12)
    # a plain forward-over-reverse problem without the fallback flag still raises for a true error
    bad = bilevel.BilevelProblem(upper, lambda x, y, b: (y["img"] @ torch.ones(3, dtype=D)))
    with pytest.raises(RuntimeError):
        bad.operators(x, y, None, hvp_mode="forward-over-reverse").hvp(v)


# -- LowerSolver ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,kw", [("sgd", {"momentum": 0.9}), ("adam", {}),
                                          ("adamw", {"weight_decay": 1e-3})])
def test_lower_solver_warm_start_equals_one_long_run(optimizer, kw):
    q, x, _ = _quad()
    y0 = {k: torch.zeros_like(v) for k, v in q.y_star(x).items()}
    solver = bilevel.LowerSolver(q.problem(), optimizer, lr=0.02, **kw)
    y_long, _, info_long = solver.run(x, y0, None, solver.init(y0), steps=40)
    y_a, state, info_a = solver.run(x, y0, None, solver.init(y0), steps=25)
    y_b, _, _ = solver.run(x, y_a, None, state, steps=15)
    for k in y0:
        assert torch.equal(y_b[k], y_long[k])   # bitwise: the state carries everything
    y_cold, _, _ = solver.run(x, y_a, None, None, steps=15)   # fresh state: a different trajectory
    if optimizer != "sgd" or kw.get("momentum"):
        assert any(not torch.equal(y_cold[k], y_long[k]) for k in y0)
    assert info_long.losses.shape == (40,) and info_a.steps == 25
    assert float(info_long.losses[-1]) < float(info_long.losses[0])


def test_lower_solver_converges_and_checks_state():
    q, x, ys = _quad()
    solver = bilevel.LowerSolver(q.problem(), "sgd", lr=1.0 / q.L)
    y0 = {k: torch.zeros_like(v) for k, v in ys.items()}
    y, state, _ = solver.run(x, y0, itertools.repeat(None), steps=600)
    # (1 − μ/L)^600 = 0.9^600 ≈ 2e-28: at the solution to rounding
    assert torch.allclose(q.vec_y(y), q.vec_y(ys), rtol=1e-10, atol=1e-12)
    adam = bilevel.LowerSolver(q.problem(), "adam", lr=0.1)
    st = adam.init(y0)
    with pytest.raises(ValueError, match="does not match the optimizer state"):
        adam.run(x, {"y0": torch.zeros(1, dtype=D), "y1": y0["y1"]}, None, st, steps=1)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        adam.run(x, y0, None, st, steps=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        bilevel.LowerSolver(q.problem(), "sgd", lr=0.0)


def test_cg_warm_start_across_calls_saves_products():
    q, x, y = _quad()
    est = bilevel.estimators.get("cg", tol=1e-10, warm_start=True, materialize="never")
    first = est(q.problem(), x, y, None, None)
    second = est(q.problem(), x, y, None, None)
    assert second.info.hvp_count < first.info.hvp_count


# -- BatchStream ------------------------------------------------------------------------------------------
def test_batch_stream_cycles_and_reshuffles():
    s = bilevel.BatchStream([1, 2, 3])
    assert [next(s) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1] and s.epoch == 2
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(list(range(20)), batch_size=20, shuffle=True)
    s = bilevel.BatchStream(loader)
    a, b = next(s), next(s)
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(20)) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="empty"):
        next(bilevel.BatchStream([]))
    gen = bilevel.BatchStream(x for x in [1, 2])
    assert next(gen) == 1 and next(gen) == 2
    with pytest.raises(ValueError, match="one-shot iterator"):
        next(gen)
    with pytest.raises(TypeError, match="re-iterable"):
        bilevel.BatchStream(5)


def test_batch_stream_feeds_estimators_and_validation_does_not_lose_a_batch():
    q, x, y = _quad()
    batches = [torch.zeros(5, 5, dtype=D) + 0.01 * i * torch.eye(5, dtype=D) for i in range(4)]
    seen = []
    stream = bilevel.BatchStream(batches)

    class Spy:
        def __next__(self):
            b = next(stream)
            seen.append(int(round(float(b[0, 0]) * 100)))
            return b
    est = bilevel.estimators.get("stochastic-neumann", terms=4, mode="stocbio", eta=0.05)
    est(q.problem(), x, y, None, Spy())
    # validation draws batch 0 and hands it on: 3 Hessian factors + 1 mixed product use 0, 1, 2, 3
    assert seen == [0, 1, 2, 3]


def test_revalidates_with_a_real_batch_after_the_structure_changes():
    # After a truncation y's shapes change: validation must run again, on a drawn batch (not None).
    q, x, y = _quad()
    calls = []

    def lower(x_, y_, batch):
        calls.append(batch)
        if batch is None:
            raise AssertionError("lower loss evaluated without a batch")
        return 0.5 * sum((t ** 2).sum() for t in y_.values()) + sum((t.sum() * x_["x0"].sum()) for t in y_.values())

    p = bilevel.BilevelProblem(lambda x_, y_, b: sum(t.sum() for t in y_.values()), lower)
    est = bilevel.estimators.get("cg")
    est(p, x, y, None, bilevel.BatchStream([1]))
    shrunk = {k: v[:-1] for k, v in y.items()}
    res = est(p, x, shrunk, None, bilevel.BatchStream([2]))
    assert all(b is not None for b in calls) and res.grad["x0"].shape == x["x0"].shape
