"""Ridge-regression hyperparameter selection (bilevel.examples.ridge) against its closed form.

F(log λ) = f(y*(λ)) with y* = (AᵀA/n + λ D)⁻¹ Aᵀt/n, D = diag(1,…,1,0) (bias unpenalised), and
dF/d log λ = −λ (D w*)ᵀ H⁻¹ ∇f. The closed form is itself checked against central finite differences
of F: with step h the error is O(h² F''') + O(ε F / h) ≈ 1e-8·|F| for h = 1e-4.
"""
import math

import pytest
import torch

import bilevel
from bilevel.examples import ridge


@pytest.fixture(scope="module")
def data():
    return ridge.make_data(seed=0)


@pytest.mark.parametrize("log_lambda", [-5.0, -2.7, 0.0, 1.5])
def test_closed_form_matches_finite_differences(data, log_lambda):
    h = 1e-4
    fd = (ridge.val_loss(data, log_lambda + h) - ridge.val_loss(data, log_lambda - h)) / (2 * h)
    assert ridge.closed_form_hypergradient(data, log_lambda) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def _estimate(data, name, log_lambda, **options):
    upper, lower = ridge.losses(data)
    problem = bilevel.BilevelProblem(upper, lower)
    x = {"log_lambda": torch.tensor(log_lambda, dtype=torch.float64)}
    y = ridge.closed_form(data, log_lambda)
    return bilevel.estimators.get(name, **options)(problem, x, y, None, None)


@pytest.mark.parametrize("log_lambda", [-5.0, -2.7, 1.5])
@pytest.mark.parametrize("name,options", [
    ("exact", {}), ("cg", {"tol": 1e-12, "maxiter": 200}),
    ("neumann", {"terms": 1200}), ("fixed-point", {"tol": 1e-12, "maxiter": 20000}),
    ("unrolled", {"steps": 1200}),
])
def test_estimators_match_closed_form(data, log_lambda, name, options):
    # H = AᵀA/n + λD has μ ≥ ~λ_min(AᵀA/n) ≈ 0.1 and L ≈ 4 + λ here; with η = 1/L the Neumann /
    # unrolled error (1 − μ/L)^K is below 1e-10 for K = 1200 (asserted below). Direct methods: rounding only.
    n = data.X_train.shape[0]
    A = torch.cat([data.X_train, torch.ones(n, 1, dtype=torch.float64)], 1)
    reg = torch.tensor([math.exp(log_lambda)] * 10 + [0.0], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(A.T @ A / n + torch.diag(reg))
    mu, L = float(ev.min()), float(ev.max())
    opts = dict(options)
    if name in ("neumann", "fixed-point"):
        opts["eta"] = 1 / L
    if name == "unrolled":
        opts["lr"] = 1 / L
    K = opts.get("terms", opts.get("steps", 0))
    if K:
        assert (1 - mu / L) ** K < 1e-10, "budget too small for the theory bound; raise K"
    res = _estimate(data, name, log_lambda, **opts)
    expected = ridge.closed_form_hypergradient(data, log_lambda)
    assert float(res.grad["log_lambda"]) == pytest.approx(expected, rel=1e-7, abs=1e-12)
    assert res.grad["log_lambda"].shape == ()


def test_first_order_misses_the_implicit_term(data):
    # f does not depend on λ directly: the first-order estimate is exactly zero.
    res = _estimate(data, "first-order", -2.7)
    assert float(res.grad["log_lambda"]) == 0.0
    assert ridge.closed_form_hypergradient(data, -1.0) != 0.0


def test_hypergradient_descent_finds_the_grid_optimum(capsys):
    # main() returns 0 only if |log λ − grid optimum| ≤ 0.1 (grid spacing 0.05) and the validation
    # loss at the found λ is within 1e-6 of the grid's best.
    assert ridge.main(["--outer-steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "| outer it |" in out and "AGREE" in out
