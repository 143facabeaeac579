"""Offline versions of three problems of benchopt's benchmark_bilevel (following its code), in torch.

* :func:`quadratic` — its ``quadratic`` dataset: inner and outer dimension 100, n = 1024 samples per
  level, μ = 0.1, L = 1; sample i has rank-one Hessians ``a_i a_iᵀ`` (inner), ``b_i b_iᵀ`` (outer) and
  a rank-one cross term ``p_i q_iᵀ`` (gen_matrices), so a mini-batch of 64 is a stochastic oracle and
  the full batch has the exact value-function gradient (closed form).
* :func:`logreg` — its ``ijcnn1`` problem (one L2 weight ``exp(x_j)`` per feature, logistic inner
  and outer losses) on scikit-learn's bundled ``load_breast_cancer`` (standardised, half train, half
  validation).
* :func:`datacleaning` — its MNIST data-cleaning problem on ``load_digits``: 50 % of the training
  labels replaced by random ones, one weight ``σ(x_i)`` per training sample, a linear softmax model with
  ``reg·‖θ‖²`` (reg = 0.2, as there); the upper loss is the validation cross-entropy.

Every problem gives a :class:`BenchProblem`: the :class:`bilevel.BilevelProblem` on index batches
(``None`` = the full data), starting points, mini-batch index streams, and the exact ``‖∇F(x)‖``
(``y*(x)`` by Newton's method on the full lower loss, then the dense implicit gradient; closed form
for the quadratic). scikit-learn is needed only for the last two (``pip install .[bench]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from .. import linear_solvers as ls
from .. import pytree as pt
from ..estimators import get as get_estimator
from ..problem import BilevelProblem

Tree = Dict[str, torch.Tensor]
D = torch.float64


def index_stream(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches of indices in ``range(n)`` (reshuffled every epoch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


@dataclass
class BenchProblem:
    name: str
    problem: BilevelProblem
    x0: Tree
    y0: Tree
    n_inner: int
    n_outer: int
    grad_norm: Callable[[Tree], float]           # exact ‖∇F(x)‖
    metrics: Callable[[Tree, Tree], Dict[str, float]] = field(default=lambda x, y: {})
    L_inner: float = 1.0                          # a bound on λ_max(∂²_yy g) (step sizes)

    def lower_stream(self, batch_size: int, seed: int):
        return index_stream(self.n_inner, batch_size, seed)

    def upper_stream(self, batch_size: int, seed: int):
        return index_stream(self.n_outer, batch_size, 10_000 + seed)


def _sel(t: torch.Tensor, idx):
    return t if idx is None else t[idx]


# -- quadratic (benchmark_utils/gen_matrices.py) --------------------------------------------------------
def _sqrt_cov(d: int, mu: float, L: float, gen, zero_first: bool = False) -> torch.Tensor:
    U = torch.linalg.svd(torch.randn(d, 1, generator=gen, dtype=D), full_matrices=True).U
    if zero_first:
        diag = torch.cat([torch.zeros(1, dtype=D), torch.logspace(math.log10(mu) / 2, math.log10(L) / 2,
                                                                  d - 1, dtype=D)])
    else:
        diag = torch.logspace(math.log10(mu) / 2, math.log10(L) / 2, d, dtype=D)
    return (U * diag) @ U.T


def _gen_level(n, d_in, d_out, L_in, L_out, L_cross, mu, gen):
    A = _sqrt_cov(d_in, mu, L_in, gen)
    a = torch.randn(n, d_in, generator=gen, dtype=D) @ A              # H_i = a_i a_iᵀ
    B = _sqrt_cov(d_out, mu, L_out, gen, zero_first=True)
    b = torch.randn(n, d_out, generator=gen, dtype=D) @ B             # outer Hessian b_i b_iᵀ
    U, _, Vh = torch.linalg.svd(torch.randn(d_out, d_in, generator=gen, dtype=D))
    k = min(d_out, d_in)
    Dm = torch.zeros(d_out, d_in, dtype=D)
    Dm[:k, :k] = torch.diag(torch.logspace(math.log10(mu), math.log10(L_cross), k, dtype=D))
    z = torch.randn(n, d_in, generator=gen, dtype=D)
    p = z @ (U @ Dm).T                                                 # cross_i = p_i q_iᵀ (d_out × d_in)
    qv = z @ Vh.T
    return dict(a=a, b=b, p=p, q=qv, lin_in=torch.randn(n, d_in, generator=gen, dtype=D),
                lin_out=torch.randn(n, d_out, generator=gen, dtype=D))


def _quad_loss(M, y, x, idx):
    a, b, p, q = (_sel(M[k], idx) for k in ("a", "b", "p", "q"))
    li, lo = _sel(M["lin_in"], idx), _sel(M["lin_out"], idx)
    return (0.5 * ((a @ y) ** 2).mean() + 0.5 * ((b @ x) ** 2).mean() + ((p @ x) * (q @ y)).mean()
            + li.mean(0) @ y + lo.mean(0) @ x)


def _quad_full(M):
    n = M["a"].shape[0]
    return dict(H=M["a"].T @ M["a"] / n, Hx=M["b"].T @ M["b"] / n, C=M["p"].T @ M["q"] / n,
                li=M["lin_in"].mean(0), lo=M["lin_out"].mean(0))


def quadratic(seed: int = 0, n: int = 1024, dim_inner: int = 100, dim_outer: int = 100, mu: float = 0.1,
              L: float = 1.0, L_cross: float = 0.1) -> BenchProblem:
    """benchmark_bilevel's quadratic problem (see module doc); redrawn until F is strongly convex."""
    gen = torch.Generator().manual_seed(2442 + seed)
    for _ in range(20):
        inner = _gen_level(n, dim_inner, dim_outer, L, L, L_cross, mu, gen)
        outer = _gen_level(n, dim_inner, dim_outer, L, L, L_cross, mu, gen)
        Fi, Fo = _quad_full(inner), _quad_full(outer)
        J = -torch.linalg.solve(Fi["H"], Fi["C"].T)                    # dy*/dx
        hess = J.T @ Fo["H"] @ J + Fo["Hx"] + 0.5 * (Fo["C"] @ J + (Fo["C"] @ J).T)
        if float(torch.linalg.eigvalsh(hess).min()) >= 1e-12:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not draw a quadratic problem with a strongly convex value function")

    def lower(x, y, idx):
        return _quad_loss(inner, y["y"], x["x"], idx)

    def upper(x, y, idx):
        return _quad_loss(outer, y["y"], x["x"], idx)

    def grad_norm(x):
        xv = x["x"]
        ys = torch.linalg.solve(Fi["H"], -Fi["li"] - Fi["C"].T @ xv)
        gy = Fo["H"] @ ys + Fo["C"].T @ xv + Fo["li"]
        gx = Fo["Hx"] @ xv + Fo["C"] @ ys + Fo["lo"]
        return float((gx - Fi["C"] @ torch.linalg.solve(Fi["H"], gy)).norm())

    return BenchProblem("quadratic", BilevelProblem(upper, lower), {"x": torch.zeros(dim_outer, dtype=D)},
                        {"y": torch.zeros(dim_inner, dtype=D)}, n, n, grad_norm,
                        L_inner=float(torch.linalg.eigvalsh(Fi["H"]).max()))


# -- problems solved by Newton's method -----------------------------------------------------------------
def _newton(problem: BilevelProblem, x: Tree, y: Tree, tol: float = 1e-11, maxiter: int = 50) -> Tree:
    """``y*(x)`` of the full lower loss (strongly convex): Newton steps, each solved by CG to 1e-12."""
    for _ in range(maxiter):
        ops = problem.operators(x, y, None)
        gy = ops.grad_y()
        if float(pt.norm(gy)) <= tol:
            break
        step, _ = ls.conjugate_gradient(ops.hvp, gy, tol=1e-12, maxiter=5000, record_history=False)
        y = pt.sub(y, step)
    return y


class _ExactGrad:
    """``‖∇F(x)‖`` at ``y*(x)`` (Newton, warm-started from the previous call), implicit solve by CG to a
    relative residual of 1e-12."""

    def __init__(self, problem: BilevelProblem, y0: Tree):
        self.problem, self.y = problem, pt.detach(y0)
        self.exact = get_estimator("cg", tol=1e-12, maxiter=5000)

    def solve(self, x: Tree) -> Tree:
        self.y = _newton(self.problem, pt.detach(x), self.y)
        return self.y

    def __call__(self, x: Tree) -> float:
        y = self.solve(x)
        g = self.exact(self.problem, pt.detach(x), y, None, None, state=self.exact.init(x, y)).grad
        return float(pt.norm(g))


def _split(X, t, n_train, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=gen)
    tr, rest = perm[:n_train], perm[n_train:]
    mean, std = X[tr].mean(0), X[tr].std(0).clamp_min(1e-8)
    Xs = (X - mean) / std
    return Xs[tr], t[tr], Xs[rest], t[rest]


def logreg(seed: int = 0) -> BenchProblem:
    """ijcnn1's problem on load_breast_cancer: ``g = mean log(1 + e^{−t·Xy}) + ½ Σ_j e^{x_j} y_j²``,
    ``f`` = the validation logistic loss; x0 = 0 (all weights 1)."""
    from sklearn.datasets import load_breast_cancer
    data = load_breast_cancer()
    X = torch.tensor(data.data, dtype=D)
    t = torch.tensor(data.target, dtype=D) * 2 - 1
    Xtr, ttr, Xva, tva = _split(X, t, X.shape[0] // 2, seed)
    d = X.shape[1]

    def lower(x, y, idx):
        Xb, tb = _sel(Xtr, idx), _sel(ttr, idx)
        return torch.nn.functional.softplus(-tb * (Xb @ y["w"])).mean() + 0.5 * (torch.exp(x["x"]) * y["w"] ** 2).sum()

    def upper(x, y, idx):
        Xb, tb = _sel(Xva, idx), _sel(tva, idx)
        return torch.nn.functional.softplus(-tb * (Xb @ y["w"])).mean()

    problem = BilevelProblem(upper, lower)
    y0 = {"w": torch.zeros(d, dtype=D)}
    L = float(torch.linalg.eigvalsh(Xtr.T @ Xtr / Xtr.shape[0]).max()) / 4 + 1.0
    return BenchProblem("logreg", problem, {"x": torch.zeros(d, dtype=D)}, y0, Xtr.shape[0], Xva.shape[0],
                        _ExactGrad(problem, y0), L_inner=L)


def datacleaning(seed: int = 0, ratio: float = 0.5, n_train: int = 1000, n_val: int = 400,
                 reg: float = 0.2) -> BenchProblem:
    """MNIST data cleaning on load_digits: ``g = mean σ(x_i) CE(θ; X_i, t̃_i) + reg‖θ‖²`` with a
    fraction ``ratio`` of corrupted labels t̃, ``f`` = validation cross-entropy; x0 = 0 (weights ½)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    X = torch.tensor(data.data, dtype=D)
    t = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=gen)
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    mean, std = X[tr].mean(0), X[tr].std(0).clamp_min(1e-8)
    X = (X - mean) / std
    t_noisy = t.clone()
    corrupt = torch.rand(n_train, generator=gen) < ratio
    t_noisy[tr[corrupt]] = torch.randint(0, 10, (int(corrupt.sum()),), generator=gen)
    Xtr, ttr, Xva, tva, Xte, tte = X[tr], t_noisy[tr], X[va], t[va], X[te], t[te]
    ce = torch.nn.functional.cross_entropy

    def lower(x, y, idx):
        Xb, tb = _sel(Xtr, idx), _sel(ttr, idx)
        w = torch.sigmoid(_sel(x["x"], idx))
        return (w * ce(Xb @ y["theta"], tb, reduction="none")).mean() + reg * (y["theta"] ** 2).sum()

    def upper(x, y, idx):
        Xb, tb = _sel(Xva, idx), _sel(tva, idx)
        return ce(Xb @ y["theta"], tb)

    problem = BilevelProblem(upper, lower)
    y0 = {"theta": torch.zeros(X.shape[1], 10, dtype=D)}

    def metrics(x, y):
        return {"test_error": float((Xte @ y["theta"]).argmax(1).ne(tte).double().mean())}
    L = float(torch.linalg.eigvalsh(Xtr.T @ Xtr / n_train).max()) / 2 + 2 * reg
    return BenchProblem("datacleaning", problem, {"x": torch.zeros(n_train, dtype=D)}, y0, n_train, n_val,
                        _ExactGrad(problem, y0), metrics=metrics, L_inner=L)


PROBLEMS = {"quadratic": quadratic, "logreg": logreg, "datacleaning": datacleaning}
