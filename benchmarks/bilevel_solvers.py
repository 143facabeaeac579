"""Stochastic bilevel solvers and implicit estimators on offline versions of benchopt's
benchmark_bilevel problems, against torchopt's implicit differentiation.

    PYTHONPATH=. .venv/bin/python benchmarks/bilevel_solvers.py             # 3 problems × 7 methods × 5 seeds
    PYTHONPATH=. .venv/bin/python benchmarks/bilevel_solvers.py --report    # table + plots from saved runs

Problems (bilevel/examples/benchmark_problems.py, float64): ``quadratic`` (d = 100 + 100, n = 1024,
μ = 0.1, L = 1, closed-form ∇F), ``logreg`` (ijcnn1's per-feature L2 weights on load_breast_cancer) and
``datacleaning`` (load_digits, 50 % corrupted training labels, one weight σ(x_i) per training sample).

Methods, all with plain SGD on x (``outer_lr``) and, where there is one, on y (``inner_lr``, mini-batches):

* alternating scheme (``bilevel.solvers.get("alternating")``): T inner SGD steps, then our ``cg``
  (warm-started through the estimator state) or ``neumann`` estimator on the full lower data, x step;
* torchopt: the same loop (same inner SGD, same batches) with ``torchopt.diff.implicit.custom_root`` and
  ``linear_solve.solve_cg`` / ``solve_inv(ns=True)`` on the full lower data: identical iterates up to
  rounding, so the wall-time ratio is a ratio at equal accuracy;
* single-loop / stochastic solvers: ``soba``, ``amigo``, ``stocbio`` on mini-batches.

Each finished run appends one JSON record to ``benchmarks/results/bilevel_solvers.jsonl`` (resumable: a
run already there is skipped). Wall time counts the steps only (the exact ‖∇F‖ evaluations are
excluded); "oracle calls" counts lower and upper gradients plus Hessian-vector and mixed products.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch
import torchopt
from torchopt.diff.implicit import custom_root as torchopt_root

import bilevel
from bilevel import pytree as pt
from bilevel.examples import benchmark_problems as bp

warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")
RESULTS = Path(__file__).parent / "results"
RECORDS = RESULTS / "bilevel_solvers.jsonl"
SEEDS = (0, 1, 2, 3, 4)

# Per problem: batch size, T inner steps, step sizes (ρ = inner_lr = linear_lr, γ = outer_lr), the
# linear-solve budgets, and outer iterations per method family (similar wall time per run).
CONFIG = {
    "quadratic": dict(batch=64, T=10, inner_lr=0.5, outer_lr=0.1, cg_tol=1e-6, cg_maxiter=100,
                      neumann_terms=30, iters_alt=60, iters_single=600, iters_amigo=120,
                      iters_stocbio=60, evals=10),
    "logreg": dict(batch=32, T=10, inner_lr=0.2, outer_lr=100.0, cg_tol=1e-6, cg_maxiter=100,
                   neumann_terms=30, iters_alt=80, iters_single=800, iters_amigo=160,
                   iters_stocbio=80, evals=10),
    "datacleaning": dict(batch=64, T=10, inner_lr=0.2, outer_lr=500.0, cg_tol=1e-6, cg_maxiter=100,
                         neumann_terms=30, iters_alt=60, iters_single=600, iters_amigo=120,
                         iters_stocbio=60, evals=6),
}
METHODS = ("alt-cg", "torchopt-cg", "alt-neumann", "torchopt-neumann", "soba", "amigo", "stocbio")
FAMILY = {"alt-cg": "alternating", "torchopt-cg": "alternating", "alt-neumann": "alternating",
          "torchopt-neumann": "alternating", "soba": "single-loop", "amigo": "single-loop",
          "stocbio": "single-loop"}


# -- torchopt in the same alternating loop ----------------------------------------------------------------
class TorchoptAlternating:
    """T inner SGD steps (the same code as ours), then torchopt's custom_root hypergradient with the
    full lower data, then the x step."""

    def __init__(self, outer_lr, inner_lr, inner_steps, solve):
        self.outer_lr, self.inner_lr, self.T, self.solve = outer_lr, inner_lr, inner_steps, solve

    def init(self, problem, x, y):
        return bilevel.solvers.SolverState(x=pt.detach(x), y=pt.detach(y))

    def step(self, problem, state, upper_batch, lower_batch, estimator_batch=None):
        x, y = state.x, state.y
        for _ in range(self.T):
            gy, _ = problem.lower_value_and_grad_y(x, y, next(lower_batch))
            y = pt.axpy(-self.inner_lr, gy, y)
        counter = [0]

        def counting(matvec, b):
            def mv(u):
                counter[0] += 1
                return matvec(u)
            return self.solve(mv, b)
        y_flat = pt.flatten(y)

        def optimality(yf, xf):
            return torch.func.grad(lambda yy: problem.g(pt.unflatten(xf, x), pt.unflatten(yy, y),
                                                        estimator_batch))(yf)

        @torchopt_root(optimality, argnums=1, solve=counting)
        def solver(y_init, xf):
            return y_flat.clone()
        xf = pt.flatten(x).detach().requires_grad_(True)
        ys = solver(y_flat, xf)
        val = problem.f(pt.unflatten(xf, x), pt.unflatten(ys, y), next(upper_batch))
        g = torch.autograd.grad(val, xf)[0]
        x = pt.axpy(-self.outer_lr, pt.unflatten(g, x), x)
        info = bilevel.solvers.SolverInfo(lower_grads=self.T, upper_grads=1, hvp_count=counter[0],
                                          mixed_count=1)
        return bilevel.solvers.SolverState(x=x, y=y, step=state.step + 1), info


def make_solver(method: str, cfg: dict, L: float):
    rho, gamma, T = cfg["inner_lr"], cfg["outer_lr"], cfg["T"]
    K = cfg["neumann_terms"]
    eta = 1.0 / L
    if method == "alt-cg":
        return bilevel.solvers.get("alternating", outer_lr=gamma, inner_lr=rho, inner_steps=T, estimator="cg",
                                   estimator_options=dict(tol=cfg["cg_tol"], maxiter=cfg["cg_maxiter"],
                                                          warm_start=True))
    if method == "alt-neumann":
        return bilevel.solvers.get("alternating", outer_lr=gamma, inner_lr=rho, inner_steps=T,
                                   estimator="neumann", estimator_options=dict(eta=eta, terms=K))
    if method == "torchopt-cg":
        return TorchoptAlternating(gamma, rho, T, torchopt.linear_solve.solve_cg(rtol=cfg["cg_tol"],
                                                                                 maxiter=cfg["cg_maxiter"]))
    if method == "torchopt-neumann":
        return TorchoptAlternating(gamma, rho, T, torchopt.linear_solve.solve_inv(ns=True, maxiter=K - 1,
                                                                                  alpha=eta))
    if method == "soba":
        return bilevel.solvers.get("soba", outer_lr=gamma / T, inner_lr=rho, linear_lr=rho)
    if method == "amigo":
        return bilevel.solvers.get("amigo", outer_lr=gamma, inner_lr=rho, linear_lr=rho, inner_steps=T)
    if method == "stocbio":
        return bilevel.solvers.get("stocbio", outer_lr=gamma, inner_lr=rho, linear_lr=rho, inner_steps=T,
                                   terms=K, seed=0)
    raise ValueError(method)


def iterations(method: str, cfg: dict) -> int:
    return {"soba": cfg["iters_single"], "amigo": cfg["iters_amigo"],
            "stocbio": cfg["iters_stocbio"]}.get(method, cfg["iters_alt"])


# -- one run ----------------------------------------------------------------------------------------------
def run(problem_name: str, method: str, seed: int) -> dict:
    cfg = CONFIG[problem_name]
    P = bp.PROBLEMS[problem_name](seed)
    solver = make_solver(method, cfg, P.L_inner)
    n_iter = iterations(method, cfg)
    every = max(1, n_iter // cfg["evals"])
    lower = P.lower_stream(cfg["batch"], seed)
    upper = P.upper_stream(cfg["batch"], seed)
    state = solver.init(P.problem, P.x0, P.y0)
    # the alternating scheme's linear solve uses the full lower data (indices 0..n−1), its SGD mini-batches
    kw = {"estimator_batch": torch.arange(P.n_inner)} if FAMILY[method] == "alternating" else {}
    clock, calls = 0.0, 0
    curve = [dict(it=0, time=0.0, calls=0, grad_norm=P.grad_norm(state.x), **P.metrics(state.x, state.y))]
    for it in range(1, n_iter + 1):
        t0 = time.perf_counter()
        state, info = solver.step(P.problem, state, upper, lower, **kw)
        clock += time.perf_counter() - t0
        calls += info.oracle_calls
        if it % every == 0 or it == n_iter:
            gn = P.grad_norm(state.x)
            curve.append(dict(it=it, time=clock, calls=calls, grad_norm=gn, **P.metrics(state.x, state.y)))
            if not math.isfinite(gn):
                break
    return dict(problem=problem_name, method=method, seed=seed, config=cfg, curve=curve,
                torch=torch.__version__, torchopt=torchopt.__version__)


def load_records() -> List[dict]:
    if not RECORDS.exists():
        return []
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]


def done_keys(records) -> set:
    return {(r["problem"], r["method"], r["seed"], json.dumps(r["config"], sort_keys=True)) for r in records}


# -- report -----------------------------------------------------------------------------------------------
def _median_curve(runs: List[dict], key: str):
    """Median over seeds at each evaluation index (runs share the evaluation schedule)."""
    n = min(len(r["curve"]) for r in runs)
    xs = [statistics.median(r["curve"][i][key] for r in runs) for i in range(n)]
    ys = [statistics.median(r["curve"][i]["grad_norm"] for r in runs) for i in range(n)]
    lo = [min(r["curve"][i]["grad_norm"] for r in runs) for i in range(n)]
    hi = [max(r["curve"][i]["grad_norm"] for r in runs) for i in range(n)]
    return xs, ys, lo, hi


def _time_to(runs: List[dict], target: float):
    """Median over seeds of the first (step) time at which ‖∇F‖ ≤ target (None if never)."""
    ts = []
    for r in runs:
        hit = next((p["time"] for p in r["curve"] if p["grad_norm"] <= target), None)
        ts.append(math.inf if hit is None else hit)
    t = statistics.median(ts)
    return None if math.isinf(t) else t


def report(records: List[dict]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by: Dict[tuple, List[dict]] = {}
    for r in records:
        if json.dumps(r["config"], sort_keys=True) == json.dumps(CONFIG[r["problem"]], sort_keys=True):
            by.setdefault((r["problem"], r["method"]), []).append(r)
    lines = ["| problem | method | seeds | outer it. | final ‖∇F‖ (median) | time [s] | oracle calls | "
             "ours/torchopt time | extra |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    goals = []
    for prob in CONFIG:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        finals = {}
        for m in METHODS:
            runs = by.get((prob, m))
            if not runs:
                continue
            last = [r["curve"][-1] for r in runs]
            gn = statistics.median(p["grad_norm"] for p in last)
            tt = statistics.median(p["time"] for p in last)
            calls = statistics.median(p["calls"] for p in last)
            finals[m] = (gn, tt, runs)
            ratio = ""
            peer = {"alt-cg": "torchopt-cg", "alt-neumann": "torchopt-neumann"}.get(m)
            if peer and by.get((prob, peer)):
                # paired by seed: same batches, same iterates up to rounding
                pr = {r["seed"]: r["curve"][-1] for r in by[(prob, peer)]}
                rs = [r["curve"][-1]["time"] / pr[r["seed"]]["time"] for r in runs if r["seed"] in pr]
                errs = [abs(r["curve"][-1]["grad_norm"] - pr[r["seed"]]["grad_norm"]) /
                        max(pr[r["seed"]]["grad_norm"], 1e-300) for r in runs if r["seed"] in pr]
                ratio = f"{statistics.median(rs):.2f} (max {max(rs):.2f}; ‖∇F‖ differs ≤ {max(errs):.0e})"
            extra = ""
            if "test_error" in last[0]:
                extra = f"test error {statistics.median(p['test_error'] for p in last):.3f}"
            lines.append(f"| {prob} | {m} | {len(runs)} | {runs[0]['curve'][-1]['it']} | {gn:.3e} | {tt:.2f} | "
                         f"{calls:.0f} | {ratio} | {extra} |")
            style = "-" if FAMILY[m] == "single-loop" else ("--" if m.startswith("torchopt") else "-.")
            for ax, key in zip(axes, ("time", "calls")):
                xs, ys, lo, hi = _median_curve(runs, key)
                line, = ax.plot(xs, ys, style, label=m, marker="o", ms=2.5)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        for ax, lab in zip(axes, ("wall time of the steps [s]", "oracle calls")):
            ax.set_xlabel(lab)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("‖∇F(x)‖ (exact), median and range of 5 seeds")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{prob}: benchmark_bilevel problem, float64, 1 thread")
        fig.tight_layout()
        fig.savefig(RESULTS / f"bilevel_solvers_{prob}.png", dpi=80)
        plt.close(fig)
        # goal 2: single-loop solvers reach the alternating scheme's final accuracy in less time
        for alt in ("alt-cg", "alt-neumann"):
            if alt not in finals:
                continue
            target, t_alt, _ = finals[alt]
            for m in ("soba", "amigo", "stocbio"):
                if m in finals:
                    t = _time_to(finals[m][2], target)
                    goals.append(f"| {prob} | {m} | {alt} | {target:.3e} | {t_alt:.2f} | "
                                 f"{'never' if t is None else f'{t:.2f}'} | "
                                 f"{'met' if t is not None and t < t_alt else 'not met'} |")
    out = "\n".join(lines)
    out += ("\n\nSingle-loop solvers against the alternating scheme's final accuracy (median over seeds; "
            "time to reach it):\n\n| problem | solver | alternating | its final ‖∇F‖ | its time [s] | "
            "solver's time to reach it [s] | goal |\n|---|---|---|---:|---:|---:|---|\n" + "\n".join(goals))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="*", default=list(CONFIG))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    p.add_argument("--report", action="store_true", help="only print the table and write the plots")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    records = load_records()
    if not args.report:
        done = done_keys(records)
        t_start = time.perf_counter()
        for prob in args.problems:
            for seed in args.seeds:
                for m in args.methods:
                    key = (prob, m, seed, json.dumps(CONFIG[prob], sort_keys=True))
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    rec = run(prob, m, seed)
                    with RECORDS.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    records.append(rec)
                    print(f"{prob:13s} {m:17s} seed {seed}: ‖∇F‖ {rec['curve'][0]['grad_norm']:.3e} → "
                          f"{rec['curve'][-1]['grad_norm']:.3e} in {rec['curve'][-1]['time']:.2f} s of steps "
                          f"({time.perf_counter() - t0:.1f} s with evaluations)", flush=True)
        print(f"total {time.perf_counter() - t_start:.0f} s\n")
    print("$ PYTHONPATH=. .venv/bin/python benchmarks/bilevel_solvers.py")
    print(f"torch {torch.__version__}, torchopt {torchopt.__version__}, {platform.machine()}, 1 thread, float64\n")
    print(report(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
