"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): several training
scenarios in one launch (process start-up is the slow part on a 2-core machine).

    torchrun --nproc_per_node=2 tests/dist_worker.py BASE_DIR

``BASE_DIR`` holds ``tiny_bert/`` (SDPA attention, transformers' default: the second-order estimators'
products run it on the math backend, bilevel.problem.second_order_mode) and ``data.csv`` (made by the
test beforehand). Each rank writes
``BASE_DIR/worker_rank{r}.json`` with what it checked; the test asserts on those files and on the
output directories (``BASE_DIR/<scenario>``).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_tiny import tiny_config  # noqa: E402

import debora  # noqa: E402
from debora.train import train  # noqa: E402
from debora.train.models import forward, loss_fn  # noqa: E402

# the bilevel preset's algorithm (the default through round 11: oblique bases, D1 = D2, fused first-order,
# per-layer budget, constant FW step on s, target_rank on the cubic schedule) on the tiny BERT (no dropout)
DEFAULT = dict(estimator="first-order", budget="per_layer", basis="oblique", split="same",
               fw_step="constant", tau=1.0, target_rank=2.0, truncate_from=0.1, epochs=1.0, batch_size=8,
               eval_every=5)
CG = dict(DEFAULT, estimator="cg", split="halves", fused_first_order=False,
          estimator_options={"warm_start": True, "maxiter": 5, "tol": 1e-12})
SNEUMANN = dict(DEFAULT, estimator="stochastic-neumann", fused_first_order=False,
                estimator_options={"terms": 3, "eta": 0.05, "mode": "ghadimi-wang"})
RESUME = {"first-order": DEFAULT, "cg": CG, "stochastic-neumann": SNEUMANN}
# the round-12 default's selection: s held at 0.1 (no FW step), the budget cut by the SVD of what
# training changed (σ² per parameter), the survivors refolded to their layer's initial Σs
SVD = dict(DEFAULT, init_s=0.1, fw_step_size=0.0, prune_by="svd", svd_allocation="sigma2_per_param",
           refold_magnitudes="auto")
# the same cut ranked by its first-order loss cost per parameter (svd_allocation="taylor"): ∂f1/∂W averaged
# over the ranks' shards
TAYLOR = dict(SVD, svd_allocation="taylor", taylor_batches=2, taylor_refresh=0.2)
# ... and by its second-order cost under the Kronecker-factored Fisher (svd_allocation="fisher"): the
# factors averaged over the ranks' shards
FISHER = dict(TAYLOR, svd_allocation="fisher")
# the SVD cut with s trained by the lower AdamW (learn_s): s is DDP's, its gradient all-reduced with the bases'
LEARN_S = dict(SVD, learn_s=True)
# ... and stepped in log s (learn_log_s): the all-reduced ∂f/∂s times s, the same on every rank
LEARN_LOG_S = dict(LEARN_S, learn_log_s=True)


class Stop(Exception):
    """Raised by a callback: the run ends right after iteration KILL_AT's checkpoint."""


KILL_AT = 4


def grads_equal_across_ranks(trainer, report):
    """After a truncation: one backward through the trainer's DDP wrapper on a different batch per rank;
    every remaining lower parameter gets a gradient and the gradients are equal on both ranks (the
    hooks are on the current Parameters and all-reduce)."""
    model, ddp = trainer.model, trainer.ddp
    lower = debora.lower_parameters(model)
    held = {id(p) for p in ddp._module_parameters}
    report["ddp_module_is_model"] = ddp.module is model
    report["ddp_holds_current_params"] = all(id(p) in held for p in lower.values() if p.numel())
    report["ddp_ignores_s"] = not any(id(p) in held for p in debora.upper_parameters(model).values())
    rank = dist.get_rank()
    idx = list(range(8 * rank, 8 * rank + 8))          # different examples on each rank
    from debora.train.data import collate
    batch = collate(trainer.d2, idx, trainer.cfg.image_size)
    for p in lower.values():
        p.grad = None
    loss_fn(forward(ddp, trainer.task, batch), batch).backward()
    grads = {k: p.grad for k, p in lower.items() if p.numel()}
    report["every_param_has_grad"] = all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    other = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(other, flat)
    report["grads_equal_across_ranks"] = bool(torch.equal(other[0], other[1]))
    report["grad_norm"] = float(flat.norm())
    for p in lower.values():
        p.grad = None


def main(base: str) -> None:
    tmp = pathlib.Path(base)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    report = {"rank": rank}
    try:
        # 1. the default path (fused first-order + truncations), with the DDP-hook check after the
        #    first truncation
        checked = {}

        def hooks(trainer, state, extra):
            if extra["removed"] and not checked:
                checked["at"] = state.iteration
                grads_equal_across_ranks(trainer, checked)

        res = train(tiny_config(tmp, output_dir=str(tmp / "ddp_default"), **DEFAULT), callback=hooks)
        report["hooks"] = checked
        report["default_world_size"] = res.trainer.world_size
        report["default_removed"] = res.summary["rank_start"] - res.summary["rank_end"]
        # 2. an implicit estimator (CG, warm start) with D1/D2 halves
        train(tiny_config(tmp, output_dir=str(tmp / "ddp_cg"), **CG))
        # 2b. the default's SVD cut (every rank re-factorises the same layers the same way)
        train(tiny_config(tmp, output_dir=str(tmp / "ddp_svd"), **SVD))
        train(tiny_config(tmp, output_dir=str(tmp / "ddp_taylor"), **TAYLOR))
        train(tiny_config(tmp, output_dir=str(tmp / "ddp_fisher"), **FISHER))
        train(tiny_config(tmp, output_dir=str(tmp / "ddp_learn_s"), **LEARN_S))
        train(tiny_config(tmp, output_dir=str(tmp / "ddp_learn_log_s"), **LEARN_LOG_S))
        # 3. interrupted and resumed runs of three estimators, against uninterrupted ones
        for name, over in RESUME.items():
            full = tiny_config(tmp, output_dir=str(tmp / f"full_{name}"), checkpoint_every=2,
                               max_iterations=8, **over)
            a = train(full)

            def stop(trainer, state, extra):
                if state.iteration == KILL_AT:
                    raise Stop()

            cut = full.replace(output_dir=str(tmp / f"cut_{name}"))
            try:
                train(cut, callback=stop)
                raise AssertionError("the interrupted run did not stop")
            except Stop:
                pass
            b = train(cut.replace(resume="auto"))
            sa = torch.cat([v.reshape(-1) for v in debora.upper_parameters(a.model).values()])
            sb = torch.cat([v.reshape(-1) for v in debora.upper_parameters(b.model).values()])
            report[f"resume_{name}_s_equal"] = bool(sa.shape == sb.shape and torch.equal(sa, sb))
            report[f"resume_{name}_est_state"] = (None if b.trainer.est_state is None else
                                                  {"step": b.trainer.est_state.step,
                                                   "warm": b.trainer.est_state.warm is not None,
                                                   "rng": b.trainer.est_state.rng is not None})
        # 4. a NaN in the lower loss of rank 1 only, at iteration 3
        os.environ["DEBORA_TEST_NAN"] = "1:3"
        try:
            res = train(tiny_config(tmp, output_dir=str(tmp / "ddp_nan"), max_iterations=6, **DEFAULT))
        finally:
            del os.environ["DEBORA_TEST_NAN"]
        report["nan_skipped"] = res.summary["nonfinite_skipped"]
        report["nan_iterations"] = res.state.iteration
        report["ok"] = True
        from debora.train.distributed import shutdown
        shutdown()
    except BaseException:   # report, then fail the launch
        report["ok"] = False
        report["error"] = traceback.format_exc()
        raise
    finally:
        with open(tmp / f"worker_rank{rank}.json", "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
