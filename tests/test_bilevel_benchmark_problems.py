"""The benchmark_bilevel problems' exact ‖∇F‖ oracles against independent computations (float64)."""
import pytest
import torch

import bilevel
from bilevel import pytree as pt
from bilevel.examples import benchmark_problems as bp


def test_quadratic_closed_form_matches_the_exact_estimator():
    # closed-form ∇F of the full-batch quadratic against y* by a dense solve + the `exact` estimator
    P = bp.quadratic(seed=0, n=128, dim_inner=12, dim_outer=9)
    x = {"x": torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    y = bp._newton(P.problem, x, P.y0)       # one exact Newton step for a quadratic
    g = bilevel.estimators.get("exact")(P.problem, x, y, None, None).grad
    assert abs(float(pt.norm(g)) - P.grad_norm(x)) <= 1e-10 * P.grad_norm(x)


def test_mini_batches_average_to_the_full_loss():
    P = bp.quadratic(seed=1, n=64, dim_inner=5, dim_outer=4)
    x, y = {"x": torch.randn(4, dtype=torch.float64)}, {"y": torch.randn(5, dtype=torch.float64)}
    parts = [P.problem.g(x, y, torch.arange(i, i + 16)) for i in range(0, 64, 16)]
    torch.testing.assert_close(torch.stack(parts).mean(), P.problem.g(x, y, None), rtol=1e-13, atol=0)
    stream = P.lower_stream(16, seed=0)
    first_epoch = torch.cat([next(stream) for _ in range(4)])
    assert sorted(first_epoch.tolist()) == list(range(64))


@pytest.mark.parametrize("name", ["logreg", "datacleaning"])
def test_exact_gradient_norm_matches_finite_differences_of_F(name):
    # F(x) = f(x, y*(x)) with y* by Newton; central differences along ∇F/‖∇F‖ give ‖∇F‖ up to O(h²)
    # (h = 1e-4, third derivatives O(1)) plus Newton's error (‖∂_y g‖ ≤ 1e-11 ⇒ negligible).
    pytest.importorskip("sklearn")
    P = bp.PROBLEMS[name](seed=0)
    x = {"x": P.x0["x"] + 0.1}
    ex = bp._ExactGrad(P.problem, P.y0)
    y = ex.solve(x)
    g = bilevel.estimators.get("cg", tol=1e-12, maxiter=5000)(P.problem, x, y, None, None).grad["x"]
    d = g / g.norm()
    h = 1e-4

    def F(xx):
        return float(P.problem.f(xx, bp._newton(P.problem, xx, y), None))
    fd = (F({"x": x["x"] + h * d}) - F({"x": x["x"] - h * d})) / (2 * h)
    assert abs(fd - float(g.norm())) <= 1e-5 * float(g.norm())
    assert abs(ex(x) - float(g.norm())) <= 1e-8 * float(g.norm())
