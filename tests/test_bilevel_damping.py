"""Tikhonov damping and negative-curvature detection of the implicit estimators (float64)."""
import pytest
import torch

import bilevel



@pytest.fixture(autouse=True)
def float64_default():
    """float64 for this module only (restored after each test, so no other test sees it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(H, B, c):
    def lower(x, y, b):
        return 0.5 * y["y"] @ H @ y["y"] - y["y"] @ (B @ x["x"])

    def upper(x, y, b):
        return 0.5 * ((y["y"] - c) ** 2).sum()

    return bilevel.BilevelProblem(upper, lower)


@pytest.mark.parametrize("name,opts", [("exact", {}), ("cg", {"tol": 1e-12, "maxiter": 200}),
                                       ("neumann", {"eta": 0.05, "terms": 2000}),
                                       ("fixed-point", {"eta": 0.05, "tol": 1e-12, "maxiter": 5000})])
def test_damped_estimators_solve_the_damped_system(name, opts):
    # Reference: ∇F_λ = −Bᵀ (H + λI)⁻¹ (y − c) with ∂_x f = 0 and ∂²_xy g = −Bᵀ.
    g = torch.Generator().manual_seed(0)
    n, m, lam = 6, 3, 0.7
    A = torch.randn(n, n, generator=g)
    H = A @ A.T + 0.5 * torch.eye(n)
    B, c = torch.randn(n, m, generator=g), torch.randn(n, generator=g)
    x = {"x": torch.randn(m, generator=g)}
    y = {"y": torch.linalg.solve(H, B @ x["x"])}
    ref = B.T @ torch.linalg.solve(H + lam * torch.eye(n), y["y"] - c)
    if name in ("neumann", "fixed-point"):
        opts = dict(opts, eta=1.0 / float(torch.linalg.eigvalsh(H).max() + lam))
    res = bilevel.estimators.get(name, damping=lam, **opts)(_problem(H, B, c), x, y, None, None)
    # exact/cg/fixed-point solve to ≤1e-12 relative residual; Neumann with 2000 terms and
    # η = 1/λ_max contracts by (1 − (μ+λ)/(L+λ))^2000 ≪ 1e-10 for this spectrum.
    assert torch.allclose(res.grad["x"], ref, rtol=1e-8, atol=1e-10)
    assert res.info.extra["damping"] == lam


def test_cg_flags_negative_curvature_instead_of_diverging():
    # Indefinite lower Hessian (a saddle): undamped CG must stop and say so, never return NaN/Inf.
    H = torch.diag(torch.tensor([2.0, 1.0, -1.0, 0.5]))
    B, c = torch.eye(4)[:, :2], torch.ones(4)
    x = {"x": torch.ones(2)}
    y = {"y": torch.tensor([0.3, -0.2, 0.4, 0.1])}
    res = bilevel.estimators.get("cg", tol=1e-10)(_problem(H, B, c), x, y, None, None)
    assert res.info.extra["negative_curvature"] is True
    assert torch.isfinite(res.grad["x"]).all()
    # Damping beyond |λ_min| makes H + λI SPD again: no flag, and the damped system is solved.
    res = bilevel.estimators.get("cg", tol=1e-12, damping=1.5)(_problem(H, B, c), x, y, None, None)
    assert res.info.extra["negative_curvature"] is False
    ref = B.T @ torch.linalg.solve(H + 1.5 * torch.eye(4), y["y"] - c)
    assert torch.allclose(res.grad["x"], ref, rtol=1e-8)


def test_bad_damping_is_rejected():
    with pytest.raises(ValueError, match="damping"):
        bilevel.estimators.get("cg", damping=-1.0)
