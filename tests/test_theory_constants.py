"""The estimators of theory_checks, checked on problems where the constant is known in closed form."""
import math

import pytest
import torch

from theory_checks import constants as C
from theory_checks.checks import thm41
from debora.manifolds import retraction
from theory_checks.problems.toy import analytic_K, make_toy

D = torch.float64


def _sym(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ Q.T


# -- K: spectral norm of a PSD Hessian -----------------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "power", "lanczos"])
def test_spectral_norm_quadratic(method):
    eigs = [0.01 * i for i in range(1, 60)] + [3.0]
    A = _sym(eigs)
    info = C.spectral_norm(lambda v: A @ v, A.shape[0], method=method, iters=500, tol=1e-10)
    assert info.value == pytest.approx(3.0, rel=1e-4)


def test_lanczos_ritz_brackets_extremes():
    A = _sym([-2.0] + [0.1 * i for i in range(1, 80)] + [9.0], seed=3)
    ev = C.lanczos_ritz(lambda v: A @ v, A.shape[0], steps=40)
    assert ev[-1] == pytest.approx(9.0, rel=1e-6)
    assert ev[0] >= -2.0 - 1e-9 and ev[0] == pytest.approx(-2.0, rel=1e-3)


@pytest.mark.parametrize("kind", ["matrix", "cp"])
def test_K_matches_closed_form_on_quadratic_toy(kind):
    """L(Ψ) = ½ mean ‖(W0 + Ψ) x − y‖² is quadratic: K = λ_max of the (im2col) Gram matrix."""
    ap = make_toy(kind, "euclidean")
    info = thm41.K_constant(ap, ap.x0["s"], ap.y_init, ap.D2)
    assert info.value == pytest.approx(analytic_K(ap), rel=1e-8)
    if kind == "matrix":   # the matrix-free path used on real models
        mv, n = ap.psi_hvp(ap.x0, ap.y_init, ap.D2)
        lz = C.spectral_norm(mv, n, method="lanczos", iters=200, tol=1e-10).value
        assert lz == pytest.approx(analytic_K(ap), rel=1e-6)


# -- β: inverse norm of an indefinite operator ---------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_inverse_norm_indefinite(method):
    eigs = [-5.0, -1.0, 0.25, -0.2, 2.0, 7.0] + [1.0 + 0.05 * i for i in range(40)]
    A = _sym(eigs, seed=1)
    info = C.inverse_norm(lambda v: A @ v, A.shape[0], method=method, iters=2000, tol=1e-12)
    assert info.value == pytest.approx(1 / 0.2, rel=1e-5)


def test_beta_nonsquare_d2_is_infinite():
    """A non-square d = 2 layer: each block [[0, cR], [cRᵀ, 0]] has |m − n| zero eigenvalues."""
    ap = make_toy("matrix", "euclidean", shape=(6, 8))
    assert ap.frozen["layer"].shape == (6, 8)
    assert math.isinf(thm41.beta_blocks_analytic(ap, ap.x0["s"], ap.y_init, ap.D2).value)
    assert math.isinf(thm41.beta_dense_tangent(ap, ap.x0["s"], ap.y_init, ap.D2).value)


def test_inverse_norm_singular_is_inf():
    A = _sym([0.0, 1.0, -2.0, 3.0])
    assert math.isinf(C.inverse_norm(lambda v: A @ v, 4).value)


def test_beta_d2_closed_form_square():
    """A = ∂_Ψ L·∂²_BΨ for Ψ = U diag(s) Vᵀ has eigenvalues ±s_i σ_j(R): β = 1/(min s · σ_min(R))."""
    ap = make_toy("matrix", "euclidean")
    assert ap.layers[0].shape[0] == ap.layers[0].shape[1]
    s = ap.x0["s"]
    R = ap.loss_gradient_psi(ap.x0, ap.y_init, ap.D2)["layer"]
    expected = 1.0 / (float(s.min()) * float(torch.linalg.svdvals(R)[-1]))
    got = thm41.beta_blocks_analytic(ap, s, ap.y_init, ap.D2).value
    dense = thm41.beta_dense_tangent(ap, s, ap.y_init, ap.D2).value
    assert got == pytest.approx(expected, rel=1e-8)
    assert dense == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["matrix", "cp"])
def test_beta_blocks_equal_dense_operator(kind):
    """The block formula (no autograd) and the autograd Hessian of ⟨R, Ψ(B)⟩ agree."""
    ap = make_toy(kind, "euclidean")
    s = ap.x0["s"]
    a = thm41.beta_blocks_analytic(ap, s, ap.y_init, ap.D2)
    b = thm41.beta_dense_tangent(ap, s, ap.y_init, ap.D2)
    assert a.value == pytest.approx(b.value, rel=1e-6)
    assert a.extra["max_abs"] == pytest.approx(b.extra["max_abs"], rel=1e-8)


# -- M: Lipschitz constant of a gradient ---------------------------------------------------------
def test_lipschitz_quadratic():
    A = _sym([-3.0, 0.5, 1.0, 2.0], seed=2)
    b = torch.tensor([0.3, -0.1, 0.2, 0.0], dtype=D)
    grad = lambda s: A @ s + b  # noqa: E731
    s0 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
    assert C.hessian_norm_fd(grad, s0, h=1e-3).value == pytest.approx(3.0, rel=1e-8)
    big = _sym([0.1 * i for i in range(1, 20)] + [4.0], seed=4)
    s1 = torch.rand(20, generator=torch.Generator().manual_seed(0), dtype=D)
    info = C.hessian_norm_fd(lambda s: big @ s, s1, h=1e-3, iters=400, tol=1e-12)
    assert info.value == pytest.approx(4.0, rel=1e-4)
    pts = [torch.randn(4, generator=torch.Generator().manual_seed(i), dtype=D) for i in range(10)]
    sec = C.secant_lipschitz(pts, [grad(p) for p in pts])
    assert max(sec) <= 3.0 + 1e-9 and min(sec) > 0


# -- χ²: known bias and variance -----------------------------------------------------------------
def test_chi_squared_bias_and_variance():
    """G̃ = ∇F + β + σ z: E[e²] at vertex v = (βᵀw)² + σ²‖w‖², w = v − s̄; sup over S is at a vertex."""
    r, tau, eps = 3, 1.0, 1e-3
    V = C.floored_simplex_vertices(r, tau, eps)
    s_bar = torch.tensor([0.3, 0.2, 0.1], dtype=D) + eps
    gF = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    bias = torch.tensor([0.1, 0.0, -0.2], dtype=D)
    sigma = 0.3
    g = torch.Generator().manual_seed(0)
    ests = [gF - bias - sigma * torch.randn(r, generator=g, dtype=D) for _ in range(40000)]
    W = V - s_bar
    exact = (W @ bias) ** 2 + sigma ** 2 * (W * W).sum(1)
    ci = C.chi_squared(gF, ests, s_bar, V)
    assert ci.chi2 == pytest.approx(float(exact.max()), rel=0.03)
    assert ci.bias2 == pytest.approx(float(((W @ bias) ** 2).max()), rel=0.05, abs=1e-3)
    # no point of S has a larger E[e²] than the vertex maximum (convexity)
    lam = torch.distributions.Dirichlet(torch.ones(r + 1, dtype=D)).sample((200,))
    inner = lam @ V
    Dm = torch.stack([gF - e for e in ests[:2000]])
    vals = (((inner - s_bar) @ Dm.T) ** 2).mean(1)
    assert float(vals.max()) <= C.chi_squared(gF, ests[:2000], s_bar, V).chi2 + 1e-12


# -- slopes, gaps, identification, complementarity -----------------------------------------------
def test_loglog_slope_exact_power_law():
    T = [2, 4, 8, 16, 32, 64, 128]
    fit = C.loglog_slope(T, [3.0 * t ** -0.5 for t in T])
    assert fit.slope == pytest.approx(-0.5, abs=1e-12)
    assert fit.ci_low <= -0.5 <= fit.ci_high
    noisy = C.loglog_slope(T, [3.0 * t ** -1.0 * (1 + 0.05 * (-1) ** i) for i, t in enumerate(T)])
    assert noisy.ci_low < -1.0 < noisy.ci_high and noisy.ci_high < -0.5


def test_fw_gap_and_diameter():
    r, tau, eps = 4, 2.0, 1e-3
    V = C.floored_simplex_vertices(r, tau, eps)
    s = V.mean(0)
    g = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=D)
    assert C.product_vertices_gap(g, s, [r], tau, eps) == pytest.approx(float(g @ s - (V @ g).min()))
    dists = torch.cdist(V, V)
    assert C.diameter_floored_simplex(r, tau) == pytest.approx(float(dists.max()))


def test_identification_iteration():
    m = lambda *b: torch.tensor(b, dtype=torch.bool)  # noqa: E731
    hist = [m(1, 1, 1), m(1, 0, 1), m(1, 1, 1), m(1, 0, 1), m(1, 0, 1), m(1, 0, 1)]
    assert C.identification_iteration(hist) == 3
    assert C.identification_iteration([m(1, 0)] * 4) == 0


def test_strict_complementarity_hand_example():
    """s* = v_1 (budget on component 1, tight); ∇F = (−1, 0.5, 2): λ_v0 = 1, λ_v2 = 1.5, λ_v3 = 3."""
    tau, eps = 1.0, 1e-3
    V = C.floored_simplex_vertices(3, tau, eps)
    s_star = V[1]
    g = torch.tensor([-1.0, 0.5, 2.0], dtype=D)
    ci = C.strict_complementarity(g, s_star, tau, eps)
    assert ci.face == [1]
    assert sorted(ci.outside) == [0, 2, 3]
    assert ci.lambda_min == pytest.approx(1.0)
    assert ci.exposed_equals_minimal


# -- the closed form: identities the measurements rely on ----------------------------------------
@pytest.mark.parametrize("kind,d", [("matrix", 2), ("cp", 4)])
@pytest.mark.parametrize("basis", ["euclidean", "oblique", "stiefel"])
def test_closed_form_identities(kind, d, basis):
    """Euler: diag(U_kᵀ ∂_{U_k} f1) = s ⊙ ∂_s f1, so G_euclid = (1 − d) ∂_s f1 and, on a manifold,
    G_riem = ∂_s f1 (the first-order estimator)."""
    import bilevel
    ap = make_toy(kind, basis)
    x, y = ap.x0, ap.y_init
    fo = bilevel.estimators.get("first-order")(ap.problem, x, y, ap.D1, ap.D2).grad["s"]
    fo_direct = torch.func.grad(lambda s: ap.loss_of_deltas(
        ap.deltas_from(s, ap.factors(y)), ap.head_of(y), ap.D1))(x["s"])
    assert torch.allclose(fo, fo_direct, atol=1e-10)
    G = ap.closed_form(x, y, ap.D1)["s"]
    assert torch.allclose(G, (1 - d) * fo_direct, rtol=1e-9, atol=1e-12)
    if basis != "euclidean":
        Gr = ap.closed_form(x, y, ap.D1, riemannian=True)["s"]
        assert torch.allclose(Gr, fo_direct, rtol=1e-9, atol=1e-12)


def test_problem_bases_are_on_debora_manifolds():
    """The problems' bases are retracted by debora.manifolds (QR for Stiefel, column norm for oblique)."""
    for basis in ("oblique", "stiefel"):
        ap = make_toy("matrix", basis)
        for k in ap.basis_keys():
            U = ap.y_init[k]
            assert torch.allclose(U, retraction(basis, U), atol=1e-12)
