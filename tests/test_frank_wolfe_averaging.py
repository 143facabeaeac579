"""GradientAveraging: the recursion, its schedule, coordinate removal, and what it buys stochastic FW."""
import math

import pytest
import torch

from bilevel import frank_wolfe as fw


def test_constant_rate_is_the_exponential_moving_average():
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(6)]
    avg, state = fw.GradientAveraging(rho=0.25), fw.GradientAveraging(0.25).init()
    for g in gs:
        d, state = avg.update(g, state)
    # d_1 = g_1, d_n = 0.75 d_{n-1} + 0.25 g_n: d_6 = 0.75^5 g_1 + sum_{k=2..6} 0.25 * 0.75^(6-k) g_k
    expected = 0.75 ** 5 * gs[0] + sum(0.25 * 0.75 ** (6 - k) * gs[k - 1] for k in range(2, 7))
    torch.testing.assert_close(d, expected, rtol=1e-14, atol=1e-14)
    assert state.n == 6
    d1, _ = fw.GradientAveraging(rho=1.0).update(gs[3], state)
    torch.testing.assert_close(d1, gs[3], rtol=0, atol=0)          # rho = 1: the gradient as is


def test_mokhtari_schedule_and_input_checks():
    avg = fw.GradientAveraging("mokhtari")
    assert avg.rate(1) == 1.0
    assert avg.rate(2) == pytest.approx(4 / 10 ** (2 / 3))
    assert avg.rate(100) == pytest.approx(4 / 108 ** (2 / 3))
    for bad in (0.0, -0.1, 1.5, "ema"):
        with pytest.raises(ValueError, match="rho"):
            fw.GradientAveraging(bad)
    with pytest.raises(ValueError, match="rho"):
        fw.GradientAveraging(float("nan"))
    _, state = avg.update(torch.zeros(4), avg.init())
    with pytest.raises(ValueError, match="remove_coordinates"):
        avg.update(torch.zeros(3), state)


def test_remove_coordinates_keeps_the_others_in_order():
    avg = fw.GradientAveraging(0.5)
    d, state = avg.update(torch.arange(6.0), avg.init())
    state = avg.remove_coordinates(state, torch.tensor([4, 1]))
    assert state.d.tolist() == [0.0, 2.0, 3.0, 5.0] and state.n == 1
    assert avg.remove_coordinates(avg.init(), torch.tensor([0])).d is None
    with pytest.raises(ValueError, match="out of range"):
        avg.remove_coordinates(state, torch.tensor([4]))


def _sfw_error(averaging, seed, steps=3000, sigma=1.0):
    """Stochastic FW on f(x) = ½‖x − x*‖² over the floored simplex, gradient x − x* + N(0, σ²)."""
    dim, tau, eps = 5, 1.0, 1e-3
    S = fw.FlooredSimplex(dim, tau, eps)
    x_star = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05], dtype=torch.float64) + eps   # inside S
    opt = fw.VanillaFW(S, step=fw.OpenLoop())
    state = opt.init(torch.full((dim,), eps + tau / (dim + 1), dtype=torch.float64))
    a_state = averaging.init() if averaging is not None else None
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        g = state.x - x_star + sigma * torch.randn(dim, generator=gen, dtype=torch.float64)
        if averaging is not None:
            g, a_state = averaging.update(g, a_state)
        _, state, _ = opt.step(g, state)
    return float((state.x - x_star).norm())


def test_averaging_removes_the_bias_of_noisy_vertices():
    """Without averaging, x_n tends to the frequencies of the noisy argmin, a biased point: its error
    does not shrink with more steps. With Mokhtari et al.'s schedule the LMO sees d_n → ∇f, and the
    error keeps falling (their rate: f(x_n) − f* = O(n^(-1/3)), so ‖x_n − x*‖ = O(n^(-1/6)))."""
    def mean_error(averaging, steps):
        return math.fsum(_sfw_error(averaging, seed, steps) for seed in range(4)) / 4
    plain_500, plain_4000 = mean_error(None, 500), mean_error(None, 4000)
    avg = fw.GradientAveraging("mokhtari")
    avg_500, avg_4000 = mean_error(avg, 500), mean_error(avg, 4000)
    assert plain_4000 > 0.9 * plain_500, (plain_500, plain_4000)          # the bias: no progress
    assert avg_4000 < 0.75 * avg_500, (avg_500, avg_4000)                  # 8^(-1/6) = 0.71
    assert avg_4000 < 0.5 * plain_4000, (avg_4000, plain_4000)
