"""Second-order products through ``scaled_dot_product_attention`` (a Hugging Face model's default
attention): its fused CPU/CUDA kernels have no derivative of their backward and no forward-mode rule, so
every estimator that forms a HVP must run it on the math backend (``bilevel.problem.second_order_mode``).

Reference: the same lower problem with attention written out (matmul + softmax), whose derivatives
autograd knows in every mode. Both compute the same function, so in float64 the hypergradients agree to
rounding (1e-10), not to a solver tolerance: the estimators run the same iterations on both.
"""
import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel.problem import math_attention

D = torch.float64
L, E, H = 6, 4, 2      # sequence length, width, heads (4-D inputs: what picks the fused CPU kernel)


def _explicit_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


def _heads(t):
    """(B, L, E) → (B, H, L, E / H)."""
    return t.unflatten(-1, (H, E // H)).transpose(1, 2)


def _problem(attention):
    """x: per-feature ridge weights (log scale); y: the attention's projections and a readout."""
    def predict(y, batch):
        X, _ = batch
        h = attention(_heads(X @ y["Wq"]), _heads(X @ y["Wk"]), _heads(X @ y["Wv"]))
        return h.transpose(1, 2).flatten(-2).mean(dim=-2) @ y["w"]

    def lower(x, y, batch):
        fit = ((predict(y, batch) - batch[1]) ** 2).mean()
        ridge = sum((torch.exp(x["log_lam"]) * y[k] ** 2).sum() for k in ("Wq", "Wk", "Wv")) \
            + 0.1 * (y["w"] ** 2).sum()
        return fit + ridge

    def upper(x, y, batch):
        return ((predict(y, batch) - batch[1]) ** 2).mean()

    return bilevel.BilevelProblem(upper, lower)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(8, L, E, generator=g, dtype=D)
    return X, torch.randn(8, generator=g, dtype=D)


def _point():
    g = torch.Generator().manual_seed(3)
    x = {"log_lam": torch.full((E,), -1.0, dtype=D) + 0.1 * torch.randn(E, generator=g, dtype=D)}
    y = {k: 0.5 * torch.randn(E, E, generator=g, dtype=D) for k in ("Wq", "Wk", "Wv")}
    y["w"] = torch.randn(E, generator=g, dtype=D)
    return x, y


ESTIMATORS = [("exact", {"hvp_mode": "reverse-over-reverse"}), ("exact", {"hvp_mode": "forward-over-reverse"}),
              ("cg", {"maxiter": 30}), ("neumann", {"terms": 5, "eta": 0.05}), ("unrolled", {"steps": 3}),
              ("stochastic-neumann", {"terms": 4, "eta": 0.05, "seed": 0, "mode": "stocbio"})]


@pytest.mark.parametrize("name,options", ESTIMATORS, ids=[f"{n}-{o.get('hvp_mode', '')}" for n, o in ESTIMATORS])
def test_hypergradient_through_sdpa_matches_explicit_attention(name, options):
    x, y = _point()
    upper_batch, lower_batch = _data(0), _data(1)
    sdpa = bilevel.estimators.get(name, **options)(_problem(F.scaled_dot_product_attention),
                                                   x, y, upper_batch, lower_batch)
    ref = bilevel.estimators.get(name, **options)(_problem(_explicit_attention), x, y, upper_batch, lower_batch)
    for k in x:
        assert torch.isfinite(sdpa.grad[k]).all()
        torch.testing.assert_close(sdpa.grad[k], ref.grad[k], rtol=1e-10, atol=1e-12)
    assert ref.grad["log_lam"].abs().max() > 1e-6           # not a trivially zero hypergradient


def test_math_attention_is_what_makes_it_work():
    """Outside the context the fused kernel is picked and a HVP through it fails: the fix is needed
    (if a torch release adds the rules, this test says so and the context can go)."""
    x, y = _point()
    problem = _problem(F.scaled_dot_product_attention)
    batch = _data(1)

    def grad_y(y_):
        return torch.func.grad(problem.g, argnums=1)(x, y_, batch)

    v = {k: torch.ones_like(t) for k, t in y.items()}
    with pytest.raises((RuntimeError, NotImplementedError), match="scaled_dot_product|not implemented"):
        torch.func.jvp(grad_y, (y,), (v,))
    with math_attention():
        out = torch.func.jvp(grad_y, (y,), (v,))[1]
    assert all(torch.isfinite(t).all() for t in out.values())
