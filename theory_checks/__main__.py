"""``python -m theory_checks [--problem toy|minilm|cnn|all] [--checks all|paper|bilevel|cut] [--device auto|cpu|cuda] [--out DIR]``"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

NOTES = [
    "Reference hypergradient: dense implicit solve (toy, verified by CG and by finite differences of "
    "re-solved lower levels) or converged CG (real models) of the damped lower level "
    "g = f2 + λ/2‖y‖² (+ gauge penalty for manifold bases); λ is part of each problem's description.",
    "Every problem is a model adapted by debora.inject (debora.MatrixAdapter / CPConv2dAdapter), its "
    "losses run through debora.bilevel_problem, manifold bases are retracted by debora.manifolds; the "
    "closed form is the library's `debora-closed-form` estimator. A row per problem checks that the "
    "problem's loss equals the adapted model's and the debora.merge_and_unload model's.",
    "Default-preset regime (checks/regime.py): the problem's base weight is W0 (the trainer folds the "
    "initial update ΔW0 of oblique bases into it: not done here); removed components stay at ε outside the "
    "LMO instead of being deleted; g = ∂_s f on the lower step's batch at the pre-step bases (the "
    "trainer's fused first-order).",
    "Default's SVD cut (checks/cut.py): s held at the default's init_s, ΔW0 folded into the base weight as "
    "the trainer does, the lower level converged (L-BFGS) instead of trained for a fixed number of Adam "
    "steps; the components are the leading r0 singular triplets of ΔW − ΔW0 per layer (the unfolded cut's).",
    "Algorithm 1 runs without truncation (n0 = ∞) and without the p̃ stop, so that the support can "
    "change back and the gap can be followed; the FW step is the library's AwayStepFW with "
    "ShortStep(M measured at s0).",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m theory_checks", description=__doc__)
    ap.add_argument("--problem", default="toy", choices=["toy", "minilm", "cnn", "all"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default="runs/theory_checks")
    ap.add_argument("--checks", default="all", choices=["all", "paper", "bilevel", "default", "cut"],
                    help="paper: the paper's setting (Thm 4.1, Assumption 6.1, M, Thm 6.2, 6.5); bilevel (alias: "
                         "default, its name until round 12): the bilevel training preset's regime (oblique, "
                         "init_s, D1 = D2, first-order, constant-step FW, count budget; toy and minilm); "
                         "cut: the round-12 default's selection (s held, the SVD cut by sigma^2 per parameter): "
                         "its key against the exact cost of removing each component (toy and minilm); all: the three")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1: faster than 2 on a shared 2-core machine)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    threads = args.threads or (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    from . import report
    from .runner import PROBLEMS, run_problem
    problems = PROBLEMS if args.problem == "all" else (args.problem,)
    t0 = time.perf_counter()
    studies = []
    for p in problems:
        try:
            studies += run_problem(p, device=device, quick=args.quick, checks=args.checks)
        except Exception as err:  # e.g. a missing packaged asset: report it, keep the others
            import traceback
            traceback.print_exc()
            print(f"[{p}] could not be built: {type(err).__name__}: {err}")
    meta = {"command": "python -m theory_checks " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": device, "threads": threads, "seconds": time.perf_counter() - t0,
            "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"), "notes": NOTES}
    report.write(studies, args.out, meta)
    print(f"report: {os.path.join(args.out, 'report.md')} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
