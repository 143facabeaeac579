"""Run every check on the instances of a problem and collect rows, plot data and timings."""
from __future__ import annotations

import time
import traceback
from dataclasses import replace
from typing import Callable, Dict, List

import torch

from . import criteria as CR
from .checks import algorithm, assumption61, lipschitz, thm41, thm62, thm65
from .study import Study, StudyConfig, row

PROBLEMS = ("toy", "minilm", "cnn")


def instances(problem: str, device: str = "cpu", quick: bool = False):
    """(factory, StudyConfig) pairs; factories are called lazily."""
    if problem == "toy":
        from .problems.toy import make_toy
        cfg = StudyConfig(T_outer=40 if quick else 100, chi_samples=8 if quick else 32,
                          fd_check=True, ref_every=None, n_checkpoints=12 if quick else 25)
        kinds = [("matrix", "euclidean")] if quick else [
            (k, b) for k in ("matrix", "cp") for b in ("euclidean", "oblique", "stiefel")]
        return [(lambda k=k, b=b: make_toy(k, b), cfg) for k, b in kinds]
    dtype = torch.float64
    cfg = StudyConfig(T_outer=30, ref_every=None, n_checkpoints=5, chi_samples=12, fd_check=False,
                      lbfgs_iter=300, lbfgs_gtol=1e-6, cg_tol=1e-8, cg_maxiter=500, lower_lr=1e-2)
    if problem == "minilm":
        from .problems.minilm import make_minilm
        return [(lambda: make_minilm(dtype=dtype, device=device), cfg)]
    if problem == "cnn":
        from .problems.cnn import make_cnn
        return [(lambda: make_cnn(dtype=dtype, device=device), cfg)]
    raise ValueError(f"unknown problem {problem!r}; choose from {PROBLEMS} or 'all'")


STEPS = [("thm41", thm41.run), ("assumption61", assumption61.run), ("lipschitz-local", lipschitz.local),
         ("algorithm", algorithm.run), ("lipschitz", lipschitz.run), ("thm62", thm62.run),
         ("thm65", thm65.run)]


def run_study(st: Study) -> Study:
    for name, fn in STEPS:
        t0 = time.perf_counter()
        try:
            fn(st)
        except Exception as err:  # a failing check is a result, not a crash of the whole report
            st.log(f"  [{st.ap.name}] {name} raised {type(err).__name__}: {err}")
            st.log(traceback.format_exc(limit=4))
            st.rows.append(row(name, st.ap, "check raised an error", f"{type(err).__name__}: {err}",
                               CR.INCONCLUSIVE, "the check could not be evaluated"))
            if name in ("thm41", "algorithm"):
                break
        st.timings.setdefault(name, time.perf_counter() - t0)
    return st


def run_regime(problem: str, device: str = "cpu", quick: bool = False, log: Callable = print) -> List[Study]:
    """The checks of the bilevel training preset's regime (checks/regime.py) on ``problem``."""
    import copy
    import bilevel
    from .checks import regime
    from .problems.base import split_halves
    out = []
    for factory, cfg, opts in regime.instances(problem, device, quick):
        t0 = time.perf_counter()
        ap = factory()
        ap.description = ap.description.replace("global budget τ", "per-layer budget τ") + (
            f"; bilevel-preset regime: oblique bases, s0 = init_s = {regime.PRESET['init_s']}, FW γ = "
            f"{regime.PRESET['gamma']} ({regime.PRESET['fw_step_schedule']}), T_max = {regime.PRESET['T_max']} "
            f"(Adam lr {regime.PRESET['lr']}, {regime.PRESET['lr_schedule']} schedule, "
            f"batch {regime.PRESET['batch']}), target rank {regime.PRESET['target_rank']:g}/adapter")
        log(f"[{ap.name}] {ap.description}")
        st = Study(ap, cfg, log)
        # D1 ≠ D2 contrast on the same examples and model: random halves of D
        ap_h = copy.copy(ap)
        n = ap.n_examples(ap.D1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 5))
        ap_h.D1, ap_h.D2 = split_halves(ap.D1, perm)
        ap_h.name, ap_h.split = ap.name + "-halves", "halves"
        ap_h.problem = bilevel.BilevelProblem(ap_h.upper_loss, ap_h.lower_loss)
        st_h = Study(ap_h, cfg, log)
        st.timings["build"] = time.perf_counter() - t0
        try:
            regime.run(st, st_h, opts)
        except Exception as err:  # a failing check is a result, not a crash of the whole report
            st.log(f"  [{ap.name}] regime raised {type(err).__name__}: {err}")
            st.log(traceback.format_exc(limit=6))
            st.rows.append(row("regime", ap, "check raised an error", f"{type(err).__name__}: {err}",
                               CR.INCONCLUSIVE, "the check could not be evaluated"))
        st.timings["total"] = time.perf_counter() - t0
        log(f"[{ap.name}] done in {st.timings['total']:.1f}s")
        for r in st.rows:
            log(f"    {r['check']:<15} {r['quantity'][:70]:<70} {r['value']}  => {r['verdict'].upper()}")
        out.append(st)
    return out


def run_problem(problem: str, device: str = "cpu", quick: bool = False, log: Callable = print,
                checks: str = "all") -> List[Study]:
    """``checks``: ``"paper"`` (the paper's setting, checks 1-5), ``"bilevel"`` (the bilevel training
    preset's regime; ``"default"``: its name until round 12), ``"cut"`` (the default's SVD cut,
    checks/cut.py) or ``"all"``."""
    out = []
    if checks in ("all", "cut"):
        from .checks import cut
        out += cut.run_cut(problem, device, quick, log)
    if checks == "cut":
        return out
    if checks in ("all", "bilevel", "default"):
        out += run_regime(problem, device, quick, log)
    if checks in ("bilevel", "default"):
        return out
    for factory, cfg in instances(problem, device, quick):
        t0 = time.perf_counter()
        ap = factory()
        log(f"[{ap.name}] {ap.description}")
        st = Study(ap, cfg, log)
        st.timings["build"] = time.perf_counter() - t0
        run_study(st)
        st.timings["total"] = time.perf_counter() - t0
        log(f"[{ap.name}] done in {st.timings['total']:.1f}s")
        for r in st.rows:
            log(f"    {r['check']:<15} {r['quantity'][:70]:<70} {r['value']}  => {r['verdict'].upper()}")
        out.append(st)
    return out
