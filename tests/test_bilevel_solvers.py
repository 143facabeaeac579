"""Linear solvers on pytrees: CG against scipy.sparse.linalg.cg and torchopt (same system, same
iteration count ⇒ the same Krylov iterate up to rounding), Neumann / fixed-point identities, dense
solve, edge cases (zero right-hand side, host-sync-free fixed budgets)."""
import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
import torchopt
from hypothesis import example, given
from hypothesis import strategies as st

from bilevel import linear_solvers as ls
from bilevel import pytree as pt


def _spd(m, kappa, seed):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, math.log10(kappa), m, dtype=torch.float64)
    H = (U * lam) @ U.T
    return 0.5 * (H + H.T), torch.randn(m, generator=gen, dtype=torch.float64)


def _tree_system(H, b, split):
    """H acting on a pytree {'a': first `split` entries (as a column), 'b': the rest}."""
    like = {"a": b[:split].reshape(-1, 1), "b": b[split:]} if 0 < split < b.numel() else {"a": b}

    def matvec(t):
        return pt.unflatten(H @ pt.flatten(t), t)
    return matvec, like


systems = st.tuples(st.integers(2, 30), st.floats(1.0, 1e3), st.integers(0, 2**31 - 1),
                    st.integers(0, 30))


@given(sys=systems, k=st.integers(1, 8))
@example(sys=(8, 422.0, 0, 2), k=8)
@example(sys=(7, 421.0, 2, 0), k=7)
def test_cg_iterates_match_scipy_and_torchopt(sys, k):
    # The k-th CG iterate from x0 = 0 is the unique minimiser of ‖v − v*‖_H over the Krylov space
    # K_k(H, b): all three implementations compute the same vector. For k ≤ 8 and κ ≤ 1e3 rounding
    # differences stay ≲ k·κ·ε·‖v_k‖ ≈ 2e-12 relative; we allow 1e-9.
    # k = m (the whole space) is excluded: there the exact residual is 0, so the last step acts on
    # a residual made of rounding noise and the implementations legitimately differ by ~1e-9
    # (seen: m = 8, κ = 422). Agreement at convergence is the next test's job.
    m, kappa, seed, split = sys
    k = min(k, m - 1)
    H, b = _spd(m, kappa, seed)
    matvec, bt = _tree_system(H, b, split % m)
    ours, info = ls.conjugate_gradient(matvec, bt, tol=0.0, maxiter=k)
    ours = pt.flatten(ours)
    ref, _ = spla.cg(H.numpy(), b.numpy(), rtol=1e-300, atol=0.0, maxiter=k)
    topt = torchopt.linalg.cg(lambda v: H @ v, b, rtol=0.0, maxiter=k)
    topt_tree = pt.flatten(torchopt.linear_solve.solve_cg(rtol=0.0, maxiter=k)(matvec, bt))
    scale = float(ours.norm())
    assert np.linalg.norm(ours.numpy() - ref) <= 1e-9 * scale
    assert float((ours - topt).norm()) <= 1e-9 * scale
    assert float((ours - topt_tree).norm()) <= 1e-9 * scale
    assert info.matvecs == k and info.iterations == k


@given(sys=systems)
def test_cg_converged_solution_matches_scipy_and_dense(sys):
    # Converged to ‖r‖ ≤ 1e-12‖b‖ ⇒ ‖v − v*‖ ≤ κ·1e-12‖v*‖ ≤ 1e-9‖v*‖ for every implementation.
    m, kappa, seed, split = sys
    H, b = _spd(m, kappa, seed)
    matvec, bt = _tree_system(H, b, split % m)
    v, info = ls.conjugate_gradient(matvec, bt, tol=1e-12, maxiter=20 * m)
    v = pt.flatten(v)
    exact = torch.linalg.solve(H, b)
    ref, flag = spla.cg(H.numpy(), b.numpy(), rtol=1e-12, atol=0.0, maxiter=20 * m)
    assert flag == 0 and info.residual <= 1e-12
    assert float((v - exact).norm()) <= 2e-9 * float(exact.norm())
    assert np.linalg.norm(v.numpy() - ref) <= 2e-9 * float(exact.norm())
    # the reported residual is the true one up to rounding drift
    true_rel = float((H @ v - b).norm() / b.norm())
    assert true_rel <= 1e-10
    # history: one entry per iterate (v_0 … v_k), starts at ‖b‖/‖b‖ = 1, ends at the reported value
    assert len(info.residual_history) == info.iterations + 1
    assert info.residual_history[0] == pytest.approx(1.0) and info.residual_history[-1] == info.residual


def test_cg_zero_rhs_gives_zero_not_nan():
    H, _ = _spd(5, 10.0, 0)
    b = {"a": torch.zeros(5, dtype=torch.float64)}
    for tol in (0.0, 1e-10):
        v, info = ls.conjugate_gradient(lambda t: {"a": H @ t["a"]}, b, tol=tol, maxiter=7)
        assert torch.equal(v["a"], torch.zeros(5, dtype=torch.float64)) and info.residual == 0.0


def test_cg_runs_past_convergence_without_nan():
    # tol = 0 and maxiter > m: after exact convergence r = 0 and pᵀHp = 0; the update must stay finite.
    H, b = _spd(3, 5.0, 1)
    v, _ = ls.conjugate_gradient(lambda t: {"a": H @ t["a"]}, {"a": b}, tol=0.0, maxiter=50)
    assert torch.isfinite(v["a"]).all()
    assert torch.allclose(v["a"], torch.linalg.solve(H, b), rtol=1e-10, atol=0)


def test_cg_warm_start_and_check_every():
    H, b = _spd(20, 100.0, 2)
    mv = lambda t: {"a": H @ t["a"]}  # noqa: E731
    exact = torch.linalg.solve(H, b)
    _, cold = ls.conjugate_gradient(mv, {"a": b}, tol=1e-10)
    v, info = ls.conjugate_gradient(mv, {"a": b}, x0={"a": exact + 1e-6}, tol=1e-10)
    assert info.iterations < cold.iterations and info.matvecs == info.iterations + 1
    assert info.residual_history[0] < 1e-4
    v2, info2 = ls.conjugate_gradient(mv, {"a": b}, tol=1e-10, check_every=4)
    assert info2.iterations % 4 == 0 and torch.allclose(v2["a"], exact, rtol=1e-8, atol=0)


def test_cg_fixed_budget_never_syncs(monkeypatch):
    # tol = 0, no history: no tensor may be converted to a Python scalar inside the loop.
    H, b = _spd(10, 10.0, 3)
    calls = {"n": 0}
    original = torch.Tensor.__bool__

    def counting(self):
        calls["n"] += 1
        return original(self)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    ls.conjugate_gradient(lambda t: {"a": H @ t["a"]}, {"a": b}, tol=0.0, maxiter=8, record_history=False)
    assert calls["n"] == 0


@given(sys=systems, terms=st.integers(1, 40))
def test_neumann_and_fixed_point_identities(sys, terms):
    # v_K = η Σ_{k<K} (I − ηH)^k b, and H⁻¹b − v_K = (I − ηH)^K H⁻¹b: the error is exactly the tail.
    m, kappa, seed, split = sys
    H, b = _spd(m, kappa, seed)
    matvec, bt = _tree_system(H, b, split % m)
    eta = 1.0 / kappa            # λ_max = κ (eigenvalues log-spaced in [1, κ])
    M = torch.eye(m, dtype=torch.float64) - eta * H
    expected = eta * sum(torch.linalg.matrix_power(M, k) for k in range(terms)) @ b
    v, info = ls.neumann_series(matvec, bt, eta, terms)
    assert float((pt.flatten(v) - expected).norm()) <= 1e-11 * float(expected.norm()) * terms
    assert info.matvecs == terms - 1
    vf, finfo = ls.fixed_point(matvec, bt, eta, tol=0.0, maxiter=terms)
    assert float((pt.flatten(vf) - expected).norm()) <= 1e-11 * float(expected.norm()) * terms
    true_res = float((H @ pt.flatten(vf) - b).norm() / b.norm())
    assert finfo.residual == pytest.approx(true_res, rel=1e-8, abs=1e-14)
    exact = torch.linalg.solve(H, b)
    assert float((exact - pt.flatten(v)).norm()) <= ((1 - eta) ** terms * (1 + 1e-9) + 1e-13) * float(exact.norm())


def test_torchopt_neumann_matches_ours():
    # torchopt.linalg.ns(maxiter=K, alpha=η) sums K + 1 terms: α Σ_{k≤K} (I − αA)^k b.
    H, b = _spd(12, 20.0, 5)
    eta = 1 / 20.0
    ours, _ = ls.neumann_series(lambda t: {"a": H @ t["a"]}, {"a": b}, eta, 31)
    theirs = torchopt.linear_solve.solve_inv(ns=True, maxiter=30, alpha=eta)(lambda v: H @ v, b)
    assert torch.allclose(ours["a"], theirs, rtol=1e-12, atol=0)


def test_dense_solve_and_singular_hessian():
    H, b = _spd(7, 50.0, 6)
    v, info = ls.dense_solve(lambda t: {"a": H @ t["a"]}, {"a": b})
    assert torch.allclose(v["a"], torch.linalg.solve(H, b), rtol=1e-12, atol=0) and info.matvecs == 7
    S = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        ls.dense_solve(lambda t: {"a": S @ t["a"]}, {"a": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="max_dim"):
        ls.dense_solve(lambda t: t, {"a": torch.ones(30)}, max_dim=10)


def test_solver_argument_errors():
    mv = lambda t: t  # noqa: E731
    b = {"a": torch.ones(3)}
    with pytest.raises(ValueError, match="tol"):
        ls.conjugate_gradient(mv, b, tol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        ls.conjugate_gradient(mv, b, maxiter=2.5)
    with pytest.raises(ValueError, match="eta"):
        ls.neumann_series(mv, b, eta=0.0, terms=3)
    with pytest.raises(ValueError, match="terms"):
        ls.neumann_series(mv, b, eta=0.1, terms=0)
    with pytest.raises(ValueError, match="x0"):
        ls.conjugate_gradient(mv, b, x0={"b": torch.ones(3)})
    with pytest.raises(ValueError, match="matvec"):
        ls.conjugate_gradient(lambda t: {"a": torch.ones(4)}, b)
