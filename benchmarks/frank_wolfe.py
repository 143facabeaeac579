"""Vanilla vs away-step vs pairwise Frank-Wolfe vs projected gradient on a quadratic over the floored simplex.

    .venv/bin/python benchmarks/frank_wolfe.py                   # the default table (~1-2 min, 1 thread)
    .venv/bin/python benchmarks/frank_wolfe.py --kappa 100       # anisotropic variant
    .venv/bin/python benchmarks/frank_wolfe.py --out table.md    # also write the markdown table

Problem: min_x f(x) = 1/2 sum_i a_i (x_i - c_i)^2 over S, with a = 1 (the issue's 1/2||x - c||^2) or a
log-spaced in [1, kappa].  S = FlooredSimplex(d, tau=1, eps=1e-3) for d = 10, 10^3, 10^5, and
ProductSet of 500 FlooredSimplex(8, 1, 1e-3) blocks (dEBORA's per-layer budget with 500 layers of rank
8).  c is built from the KKT conditions so that the optimum x* is known exactly and lies in the relative
interior of a face: k = ceil(sqrt(d)) coordinates above the floor (3 per block for the ProductSet),
strict complementarity margin >= 0.2 on the others (seeded).

Methods, all from the floor vertex eps*1 and stopped when the FW gap -g^T(z - x) (z = LMO(g), exact
gradient g) is <= 1e-6, or at the iteration cap ("not reached" in the table):
  * VanillaFW / AwayStepFW / PairwiseFW with ShortStep(lipschitz=L), L = max a_i, blockwise steps;
  * projected gradient x <- P_S(x - g/L) with the sort-based projection ``S.project`` (O(d log d));
    its wall time includes one LMO per iteration for the gap certificate.
Wall time is measured with ``time.perf_counter`` around the whole loop (CPU, ``--threads`` torch
threads; 1 by default because the machine is shared).
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bilevel import frank_wolfe as fw  # noqa: E402

F64 = torch.float64


def face_optimum(S, k, gen, kappa):
    """(c, a, x*) with x* known exactly from the KKT conditions of min 1/2 sum a_i (x_i - c_i)^2 over a
    FlooredSimplex or a ProductSet of them: x* on a face with k support coordinates per block (the budget
    is active, multiplier theta = 0.3) and complementarity margins mu_i in [0.2, 1] off the support:
    a * (x* - c) + theta - mu = 0."""
    blocks = S.blocks if isinstance(S, fw.ProductSet) else [S]
    xs, mu = [], []
    for b in blocks:
        I = torch.randperm(b.dim, generator=gen)[:k]
        u = torch.rand(k, dtype=F64, generator=gen) + 0.2
        x = torch.full((b.dim,), b.eps, dtype=F64)
        x[I] += u / u.sum() * b.tau
        m = torch.rand(b.dim, dtype=F64, generator=gen) * 0.8 + 0.2
        m[I] = 0.0
        xs.append(x)
        mu.append(m)
    xs, mu = torch.cat(xs), torch.cat(mu)
    if kappa == 1:
        a = torch.ones(S.dim, dtype=F64)
    else:
        a = torch.logspace(0, math.log10(kappa), S.dim, dtype=F64)[torch.randperm(S.dim, generator=gen)]
    c = xs + (0.3 - mu) / a
    return c, a, xs


def problems(seed: int, kappa: float):
    """(name, S, c, a, x*, support size per block)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for d in (10, 1_000, 100_000):
        k = math.ceil(math.sqrt(d))
        S = fw.FlooredSimplex(d, 1.0, 1e-3)
        out.append((f"FlooredSimplex d={d}", S, *face_optimum(S, k, gen, kappa), k))
    S = fw.ProductSet([fw.FlooredSimplex(8, 1.0, 1e-3)] * 500)
    out.append(("ProductSet 500 x FlooredSimplex(8)", S, *face_optimum(S, 3, gen, kappa), 3))
    return out


def run_fw(cls, S, c, a, tol, cap):
    L = float(a.max())
    opt = cls(S, step=fw.ShortStep(lipschitz=L))
    state = opt.init(S.lmo(torch.zeros(S.dim, dtype=F64)))
    t0 = time.perf_counter()
    for k in range(cap):
        g = a * (state.x - c)
        _, new, info = opt.step(g, state)
        if float(info.gap) <= tol:          # gap of the current iterate: it is certified, stop
            return k, time.perf_counter() - t0, float(info.gap), True, state
        state = new
    g = a * (state.x - c)
    gap = float(g @ (state.x - S.lmo(g)))
    return cap, time.perf_counter() - t0, gap, gap <= tol, state


def run_pg(S, c, a, tol, cap):
    L = float(a.max())
    x = S.lmo(torch.zeros(S.dim, dtype=F64))
    t0 = time.perf_counter()
    for k in range(cap):
        g = a * (x - c)
        gap = float(g @ (x - S.lmo(g)))
        if gap <= tol:
            return k, time.perf_counter() - t0, gap, True, x
        x = S.project(x - g / L)
    g = a * (x - c)
    gap = float(g @ (x - S.lmo(g)))
    return cap, time.perf_counter() - t0, gap, gap <= tol, x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tol", type=float, default=1e-6, help="FW-gap target (default 1e-6)")
    p.add_argument("--kappa", type=float, default=1.0, help="condition number of the diagonal Hessian")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap", type=int, default=20_000, help="iteration cap for d <= 1e4 and the ProductSet")
    p.add_argument("--cap-large", type=int, default=2_000, help="iteration cap for d = 1e5")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=str, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cmd = "python benchmarks/frank_wolfe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{cmd.strip()}`  ",
             f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
             f"float64, kappa={args.kappa:g}, FW-gap target {args.tol:g}, seed {args.seed}",
             "",
             "| problem | dim | support of x* | method | iterations to gap | wall time [s] | ms / iter | final gap "
             "| max abs(x - x*) | active set |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    methods = [("projected gradient", None), ("vanilla FW", fw.VanillaFW), ("away-step FW", fw.AwayStepFW),
               ("pairwise FW", fw.PairwiseFW)]
    for name, S, c, a, xs, k in problems(args.seed, args.kappa):
        support = f"{k}" if not isinstance(S, fw.ProductSet) else f"{k} per block"
        for mname, cls in methods:
            cap = args.cap_large if S.dim >= 50_000 else args.cap
            if cls is None:
                n, t, gap, ok, x = run_pg(S, c, a, args.tol, cap)
                active = "-"
            else:
                n, t, gap, ok, state = run_fw(cls, S, c, a, args.tol, cap)
                x = state.x
                active = str(int(state.active_set_size))
            it = f"{n}" if ok else f"not reached (cap {cap})"
            err = float((x - xs).abs().max())
            row = (f"| {name} | {S.dim} | {support} | {mname} | {it} | {t:.3f} | {1e3 * t / max(n, 1):.3f} | "
                   f"{gap:.2e} | {err:.1e} | {active} |")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
