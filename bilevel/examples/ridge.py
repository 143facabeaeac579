"""Tune a ridge penalty by hypergradient descent, and check it against a grid search.

    python -m bilevel.examples.ridge [--estimator cg] [--outer-steps 60] [--seed 0]

Data: a fixed-seed synthetic regression shaped like the classic *diabetes* set (442 patients,
10 correlated standardised features, 3 of them informative, noisy target), split 60/40 into a
training part D2 (lower level) and a validation part D1 (upper level). With x = {log_lambda}
(λ = e^{log_lambda}) and y = {w, b}:

    g(x, y) = 1/(2 n₂) ‖X₂ w + b − t₂‖² + ½ λ ‖w‖²           (lower: ridge fit on D2)
    f(x, y) = 1/(2 n₁) ‖X₁ w + b − t₁‖²                       (upper: validation loss on D1)

Each outer iteration runs T_max warm-started steps of heavy-ball SGD on g (bilevel.LowerSolver),
asks the chosen estimator for ∇F(log λ) and takes an Adam step on log λ. The closed form
``y*(λ) = argmin g`` gives the true validation curve, used for the table and the grid search.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torchopt

import bilevel


@dataclass
class RidgeData:
    X_train: torch.Tensor
    t_train: torch.Tensor
    X_val: torch.Tensor
    t_val: torch.Tensor


def make_data(n: int = 442, d: int = 10, seed: int = 0, noise: float = 1.0,
              dtype=torch.float64) -> RidgeData:
    """Correlated Gaussian features (AR(1) correlation 0.6), 3 informative ones, noise σ = ``noise``."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(d, dtype=torch.float64)
    cov = 0.6 ** (idx[:, None] - idx[None, :]).abs()
    Z = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    Z = (Z - Z.mean(0)) / Z.std(0)
    coef = torch.zeros(d, dtype=torch.float64)
    coef[[0, 2, 5]] = torch.tensor([1.0, -0.6, 0.4], dtype=torch.float64)
    t = Z @ coef + 0.5 + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    tr, va = perm[: int(0.6 * n)], perm[int(0.6 * n):]
    # few training points relative to the noise: the validation-optimal λ is well inside the grid
    tr = tr[:40]
    return RidgeData(Z[tr].to(dtype), t[tr].to(dtype), Z[va].to(dtype), t[va].to(dtype))


def losses(data: RidgeData):
    def lower(x, y, batch=None):
        r = data.X_train @ y["w"] + y["b"] - data.t_train
        return 0.5 * (r @ r) / r.numel() + 0.5 * torch.exp(x["log_lambda"]) * (y["w"] @ y["w"])

    def upper(x, y, batch=None):
        r = data.X_val @ y["w"] + y["b"] - data.t_val
        return 0.5 * (r @ r) / r.numel()
    return upper, lower


def closed_form(data: RidgeData, log_lambda: float):
    """``y*(λ)`` by a dense solve of the normal equations (bias unpenalised)."""
    n, d = data.X_train.shape
    A = torch.cat([data.X_train, torch.ones(n, 1, dtype=data.X_train.dtype)], 1)
    reg = torch.zeros(d + 1, dtype=A.dtype)
    reg[:d] = math.exp(log_lambda)
    sol = torch.linalg.solve(A.T @ A / n + torch.diag(reg), A.T @ data.t_train / n)
    return {"w": sol[:d], "b": sol[d]}


def closed_form_hypergradient(data: RidgeData, log_lambda: float) -> float:
    """``dF/d log λ = −λ w*ᵀ [∂²_ww g]⁻¹ ∂_w f`` (the bias block included in the solve)."""
    n, d = data.X_train.shape
    y = closed_form(data, log_lambda)
    A = torch.cat([data.X_train, torch.ones(n, 1, dtype=data.X_train.dtype)], 1)
    reg = torch.zeros(d + 1, dtype=A.dtype)
    reg[:d] = math.exp(log_lambda)
    Hm = A.T @ A / n + torch.diag(reg)
    B = torch.cat([data.X_val, torch.ones(data.X_val.shape[0], 1, dtype=A.dtype)], 1)
    theta = torch.cat([y["w"], y["b"].reshape(1)])
    grad_f = B.T @ (B @ theta - data.t_val) / B.shape[0]
    dtheta = -torch.linalg.solve(Hm, torch.cat([math.exp(log_lambda) * y["w"], torch.zeros(1, dtype=A.dtype)]))
    return float(dtheta @ grad_f)


def val_loss(data: RidgeData, log_lambda: float) -> float:
    upper, _ = losses(data)
    return float(upper(None, closed_form(data, log_lambda)))


def grid_search(data: RidgeData, lo: float = -8.0, hi: float = 4.0, points: int = 241):
    grid = torch.linspace(lo, hi, points).tolist()
    vals = [val_loss(data, g) for g in grid]
    i = min(range(points), key=vals.__getitem__)
    return grid[i], vals[i]


def tune(data: RidgeData, estimator: str = "cg", outer_steps: int = 60, inner_steps: int = 30,
         log_lambda0: float = 2.0, outer_lr: float = 0.2, log_every: int = 10, out=sys.stdout):
    upper, lower = losses(data)
    problem = bilevel.BilevelProblem(upper, lower)
    d = data.X_train.shape[1]
    dtype = data.X_train.dtype
    x = {"log_lambda": torch.tensor(log_lambda0, dtype=dtype)}
    y = {"w": torch.zeros(d, dtype=dtype), "b": torch.zeros((), dtype=dtype)}
    # step 1/L for the lower problem at the smallest λ we expect (L ≤ λ_max(AᵀA/n) + λ)
    n = data.X_train.shape[0]
    A = torch.cat([data.X_train, torch.ones(n, 1, dtype=dtype)], 1)
    L = float(torch.linalg.eigvalsh(A.T @ A / n).max()) + math.exp(log_lambda0)
    options = {"cg": dict(tol=1e-10, maxiter=50), "exact": {},
               "neumann": dict(eta=1 / L, terms=200), "fixed-point": dict(eta=1 / L, tol=1e-8, maxiter=2000),
               "unrolled": dict(lr=1 / L, steps=100), "first-order": {},
               "stochastic-neumann": dict(eta=1 / L, terms=200, seed=0)}.get(estimator, {})
    est = bilevel.estimators.get(estimator, **options)
    lower_solver = bilevel.LowerSolver(problem, "sgd", lr=1 / L, momentum=0.9)
    lower_state = lower_solver.init(y)
    # Adam on log λ with short memories: the hypergradient shrinks by 20x on the way to the optimum,
    # and default β₂ = 0.999 would keep the step tiny long after the large early gradients.
    opt = torchopt.adam(outer_lr, betas=(0.5, 0.9))
    opt_state = opt.init(x)
    rows = []
    t0 = time.perf_counter()
    for it in range(outer_steps + 1):
        y, lower_state, _ = lower_solver.run(x, y, None, lower_state, steps=inner_steps)
        res = est(problem, x, y, None, None)
        lam = float(x["log_lambda"])
        if it % log_every == 0 or it == outer_steps:
            rows.append((it, lam, math.exp(lam), val_loss(data, lam), float(res.grad["log_lambda"]),
                         closed_form_hypergradient(data, lam), res.info.hvp_count))
        if it == outer_steps:
            break
        updates, opt_state = opt.update(res.grad, opt_state, inplace=False)
        x = torchopt.apply_updates(x, updates, inplace=False)
    return x, rows, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--estimator", default="cg", help=f"one of {bilevel.estimators.available()}")
    p.add_argument("--outer-steps", type=int, default=60)
    p.add_argument("--inner-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = make_data(seed=args.seed)
    print(f"$ python -m bilevel.examples.ridge --estimator {args.estimator} --outer-steps {args.outer_steps}"
          f" --inner-steps {args.inner_steps} --seed {args.seed}")
    print(f"data: {data.X_train.shape[0]} train (lower, D2) / {data.X_val.shape[0]} validation (upper, D1),"
          f" {data.X_train.shape[1]} features\n")
    x, rows, wall = tune(data, args.estimator, args.outer_steps, args.inner_steps)
    print("| outer it | log λ | λ | val loss F(λ) | hypergrad (est.) | hypergrad (closed form) | HVPs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for it, ll, lam, vl, g, gt, h in rows:
        print(f"| {it} | {ll:+.4f} | {lam:.4g} | {vl:.6f} | {g:+.3e} | {gt:+.3e} | {h} |")
    best_ll, best_val = grid_search(data)
    found = float(x["log_lambda"])
    print(f"\nhypergradient descent ({args.estimator}): log λ = {found:+.4f} (λ = {math.exp(found):.4g}), "
          f"val loss {val_loss(data, found):.6f}, {wall:.2f} s")
    print(f"grid search (241 points in [-8, 4]):      log λ = {best_ll:+.4f} (λ = {math.exp(best_ll):.4g}), "
          f"val loss {best_val:.6f}")
    print(f"no regularisation (λ = e^-8):             val loss {val_loss(data, -8.0):.6f}")
    gap = abs(found - best_ll)
    ok = gap <= 0.1 and val_loss(data, found) <= best_val + 1e-6
    print(f"|log λ − grid optimum| = {gap:.3f} (grid spacing 0.05): {'AGREE' if ok else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
