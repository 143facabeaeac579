"""stochastic-neumann (Ghadimi & Wang 2018; Ji et al. 2021) on a quadratic problem with noisy lower
Hessians H_ξ = H + E_ξ, E[E_ξ] = 0, Var(E_ξ) ∝ 1/B (bilevel.testing.QuadraticBilevel).

Ghadimi–Wang: K ~ U{0..N−1}, v̂ = ηN ∏_{j≤K}(I − ηH_{ξ_j}) ∂_y f with independent ξ_j, so
E[v̂] = η Σ_{k<N} (I − ηH)^k ∂_y f = v_N (the N-term series with the *mean* Hessian), and
E[ĝ] = ∂_x f − Cᵀ v_N. Write ĝ = d(K) + n where d(K) = ∂_x f − Cᵀ ηN(I − ηH)^K ∂_y f is the value with
the exact Hessian at the drawn K and n the Hessian-noise part: E[n | K] = 0 and, to first order in E_ξ,
n is a sum of K terms linear in independent E_{ξ_j}, so E‖n‖² ∝ 1/B.
"""
import math

import torch

import bilevel
from bilevel.testing import QuadraticBilevel

N_TERMS = 8


def _setup(seed=0):
    q = QuadraticBilevel.random(4, 6, kappa=5.0, seed=seed)
    x = q.random_x()
    y = q.y_star(x)
    eta = 1.0 / (1.5 * q.L)   # η(L + ‖E‖) < 1 for the perturbed Hessians as well
    return q, x, y, eta


def _flat(q, g):
    return torch.cat([g[k].reshape(-1) for k in q.x_shapes])


def _draws(q, x, y, eta, batch_size, n_draws, seed, mode="ghadimi-wang"):
    problem = q.problem()
    est = bilevel.estimators.get("stochastic-neumann", eta=eta, terms=N_TERMS, mode=mode, seed=seed)
    stream = q.stochastic_lower_batches(batch_size, noise=0.5, seed=seed + 1)
    grads, ks = [], []
    for _ in range(n_draws):
        res = est(problem, x, y, None, stream)
        grads.append(_flat(q, res.grad))
        ks.append(res.info.extra.get("K"))
    return torch.stack(grads), ks


def _truncated_target(q, x, eta):
    """∂_x f − Cᵀ v_N with v_N = η Σ_{k<N}(I − ηH)^k ∂_y f (N = N_TERMS)."""
    return q.hypergradient(x) + q.neumann_error(x, eta, N_TERMS)


def _deterministic_at_K(q, x, eta, K):
    ys = q.y_star(x)
    M = torch.eye(q.H.shape[0], dtype=torch.float64) - eta * q.H
    v = eta * N_TERMS * torch.linalg.matrix_power(M, K) @ q.grad_y_f(x, ys)
    return q.grad_x_f(x, ys) - q.C.T @ v


def test_mean_matches_truncated_series_within_confidence_interval():
    # CLT: the mean of M i.i.d. draws lies within z·s/√M of E[ĝ] per coordinate; z = 4.5 gives a
    # two-sided false-alarm rate of 7e-6 per coordinate (seeds are fixed, so the test is deterministic).
    q, x, y, eta = _setup()
    G, ks = _draws(q, x, y, eta, batch_size=4, n_draws=1500, seed=11)
    M = G.shape[0]
    z = 4.5
    target = _truncated_target(q, x, eta)
    se = G.std(0) / math.sqrt(M)
    assert torch.all((G.mean(0) - target).abs() <= z * se), (G.mean(0) - target, se)
    # The noise part alone (K's variance removed): zero mean, a much tighter interval.
    noise = G - torch.stack([_deterministic_at_K(q, x, eta, k) for k in ks])
    assert torch.all(noise.mean(0).abs() <= z * noise.std(0) / math.sqrt(M))
    # K is uniform on {0, …, N−1}: each value appears M/N ± 5σ times.
    counts = torch.bincount(torch.tensor(ks), minlength=N_TERMS).double()
    p = 1.0 / N_TERMS
    assert counts.numel() == N_TERMS
    assert torch.all((counts - M * p).abs() <= 5 * math.sqrt(M * p * (1 - p)))
    # The test has power: an estimator off by one Hessian factor (K + 1 instead of K) leaves a noise
    # part whose mean is far outside the same interval, and so would a missing factor N.
    for wrong in (lambda k: _deterministic_at_K(q, x, eta, k + 1),
                  lambda k: (q.grad_x_f(x, q.y_star(x)) + _deterministic_at_K(q, x, eta, k) * (N_TERMS - 1))
                  / N_TERMS):
        off = G - torch.stack([wrong(k) for k in ks])
        assert torch.any(off.mean(0).abs() > z * off.std(0) / math.sqrt(M))


def test_variance_falls_with_batch_size():
    # E‖n‖² ∝ 1/B to first order: going from B = 1 to B = 16 divides it by ≈ 16. Sampling error of the
    # mean square with 600 draws is ~10–20%, second-order terms in E_ξ make the fall slightly faster:
    # accept a ratio in [8, 32]. Total variance (K's share included) must fall too.
    q, x, y, eta = _setup(seed=3)
    stats = {}
    for B in (1, 16):
        G, ks = _draws(q, x, y, eta, batch_size=B, n_draws=600, seed=5)
        noise = G - torch.stack([_deterministic_at_K(q, x, eta, k) for k in ks])
        stats[B] = (float((noise ** 2).sum(1).mean()), float(G.var(0).sum()))
    ratio = stats[1][0] / stats[16][0]
    assert 8.0 <= ratio <= 32.0, ratio
    assert stats[16][1] < stats[1][1]


def test_stocbio_mean_matches_truncated_series():
    # Ji et al. (2021): the N-term recurrence with a fresh batch per product is also unbiased for v_N.
    q, x, y, eta = _setup(seed=1)
    G, _ = _draws(q, x, y, eta, batch_size=2, n_draws=400, seed=2, mode="stocbio")
    se = G.std(0) / math.sqrt(G.shape[0])
    assert torch.all((G.mean(0) - _truncated_target(q, x, eta)).abs() <= 4.5 * se)


def test_each_product_draws_its_own_batch():
    q, x, y, eta = _setup()
    seen = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            b = next(self.inner)
            seen.append(id(b))
            return b

    stream = Counting(q.stochastic_lower_batches(3, seed=0))
    est = bilevel.estimators.get("stochastic-neumann", eta=eta, terms=N_TERMS, seed=0)
    problem = q.problem()
    problem.validate(x, y, None, next(q.stochastic_lower_batches(1)))
    total = 0
    for _ in range(20):
        res = est(problem, x, y, None, stream)
        total += res.info.hvp_count + res.info.mixed_count   # K Hessian factors + 1 mixed product
    assert len(seen) == total and res.info.mixed_count == 1
    # seeded estimators reproduce their draws of K
    a = bilevel.estimators.get("stochastic-neumann", seed=3, terms=50)
    b = bilevel.estimators.get("stochastic-neumann", seed=3, terms=50)
    ks_a = [a(problem, x, y, None, stream).info.extra["K"] for _ in range(5)]
    ks_b = [b(problem, x, y, None, stream).info.extra["K"] for _ in range(5)]
    assert ks_a == ks_b


def test_unseeded_estimator_is_reproducible_under_manual_seed():
    # (it used to call torch.seed(), which re-seeds the global RNG non-deterministically)
    q, x, y, eta = _setup()
    problem = q.problem()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        est = bilevel.estimators.get("stochastic-neumann", terms=50)
        after = torch.rand(3)
        runs.append(([est(problem, x, y, None, q.stochastic_lower_batches(1)).info.extra["K"]
                      for _ in range(5)], after))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
