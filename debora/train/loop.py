"""The dEBORA training loop (paper §4, Algorithm 1 with the stochastic hypergradient of Algorithm 2).

One outer iteration n::

    D2 batches → T_max lower steps (AdamW on bases + head; tangent projection + retraction)
    D1 batch   → estimator (any registered name, or an object) → g_n ≈ ∇F(s_n)
    g_n        → Frank-Wolfe step on s (away-step by default) unless its gap ≤ p̃
    n ≥ n0     → truncation of the components at the floor ε (bases, s, optimizer state, FW active set)

The :class:`Trainer` owns the loop; the estimator and the Frank-Wolfe solver are objects handed to it.
All mutable training state lives in :class:`TrainState` (no module-level state), so that the same
code can later run one replica per process under ``torch.distributed``.

Several processes (``torchrun``, :mod:`~debora.train.distributed`): every sampler draws *global*
batches of N·``batch_size`` and each rank takes its shard; the lower steps run through
``DistributedDataParallel`` (gradient accumulation under ``no_sync``); ∂_s f, the hypergradient and
the estimator's products are averaged over the ranks, so Frank-Wolfe runs identically on every rank;
the truncation mask is rank 0's, checked by every rank; skip / freeze decisions are checked to agree.
Estimators run on the unwrapped module. Rank 0 alone writes metrics and checkpoints.

Host synchronisation: the lower loop checks each step's loss for NaN/Inf (one scalar per step, needed
to *skip* a bad step); losses and accuracies are otherwise accumulated on the device and read every
``log_every`` iterations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

import bilevel
import debora
from bilevel.frank_wolfe import AveragingState, GradientAveraging

from . import checkpoint as ckpt
from . import distributed as distmod
from .batchnorm import batch_statistics, recalibrate_batchnorm
from .budget import allocation_key, scheduled_count, smallest_beyond
from .lr_schedule import lr_factor
from . import resume as resume_checks
from .data import Examples, collate, to_device
from .fwsetup import SLayout, feasible_set, solver as make_solver, step_rule
from .models import forward, inputs_fn, loss_fn
from .sensitivity import TAYLOR_KEYS
from .split import Sampler

from debora.inject import saved_modules  # noqa: E402  (the submodule, not the function debora.inject)
from debora.refactor import has_svd, refold_magnitudes_  # noqa: E402

# learn_s: the τ of the Frank-Wolfe set that only mirrors s (it never binds; the image preset's τ)
_UNBOUNDED_TAU = 1e6


class NonFiniteError(FloatingPointError):
    """Raised when more than ``max_nonfinite`` steps had to be skipped for NaN/Inf values."""


@dataclass
class TrainState:
    """Everything that changes during training (and goes into a checkpoint)."""

    iteration: int                       # completed outer iterations n
    fw_state: Any                        # Frank-Wolfe solver state (active set, weights, s)
    optimizer: torch.optim.Optimizer     # lower-level AdamW over debora.lower_parameters(model)
    layout: SLayout                      # s blocks (names, sizes, original component ids)
    d1: Sampler                          # upper-level batches
    d2: Sampler                          # lower-level batches
    d2_est: Sampler                      # lower batches handed to estimators that use them
    skipped_lower: int = 0
    skipped_upper: int = 0
    s_frozen: bool = False               # FW gap stayed below p̃ for gap_patience iterations: s fixed
    below_tol: int = 0                   # consecutive iterations with FW gap <= p̃
    last_gap: Optional[float] = None
    grad_avg: Any = None                 # bilevel.frank_wolfe.AveragingState (fw_grad_averaging < 1)
    elapsed: float = 0.0                 # wall seconds of previous sessions (resume)
    history: Dict[str, Any] = field(default_factory=dict)   # eval at start, best eval, ...


class _Batches:
    """An endless iterator of device batches from a sampler (what estimators draw lower batches from)."""

    def __init__(self, trainer: "Trainer", sampler: Sampler, examples: Examples):
        self.trainer, self.sampler, self.examples = trainer, sampler, examples

    def __iter__(self):
        return self

    def __next__(self):
        return self.trainer.batch(self.examples, self.sampler.next())


def _finite(tree: Dict[str, torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(v).all() for v in tree.values()]).all())


@contextlib.contextmanager
def eval_mode(model):
    """Dropout and other train-mode randomness off inside, the previous mode restored after: the
    hypergradient and the Armijo objective estimate F(s) = f1(B*(s), s), a deterministic function of s."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def nonfinite_parameters(model) -> List[str]:
    """Names of the trainable (upper and lower) parameters holding NaN/Inf: one fused check, one host
    sync; the names are only looked up when the check fails."""
    params = {**debora.upper_parameters(model), **debora.lower_parameters(model)}
    if not params:
        return []
    flags = torch.stack([torch.isfinite(p.detach()).all() for p in params.values()])
    if bool(flags.all()):
        return []
    return [n for n, ok in zip(params, flags.tolist()) if not ok]



@torch.no_grad()
def log_space_step(opt: torch.optim.Optimizer, params: List[torch.nn.Parameter]) -> None:
    """``opt.step()`` with ``params`` (positive; learn_log_s: the magnitudes s) stepped in θ = log p:
    ∂f/∂θ = p ⊙ ∂f/∂p, θ ← the optimizer's step on θ, p = exp θ — for AdamW, p ← p·exp(−η·u), a step on
    each p's own scale. ``params`` hold θ only inside this call, so the optimizer's moments for them are
    θ's. Fused ops, no host sync."""
    ps = [p for p in params if p.grad is not None]
    if ps:
        torch._foreach_mul_([p.grad for p in ps], ps)
        torch._foreach_log_(ps)
    opt.step()
    if ps:
        torch._foreach_exp_(ps)


class Trainer:
    """Bilevel training of a dEBORA-adapted model.

    Args:
        model: a model with adapters (``debora.inject``), on ``device``.
        cfg: a :class:`~debora.train.config.TrainConfig`.
        task: ``"text"`` or ``"image"``.
        d1, d2: training examples of the upper / lower level (``Examples``; may be the same object).
        eval_examples: the held-out evaluation examples.
        estimator: a registered estimator name or an estimator object (default ``cfg.estimator``).
        fw_solver: a Frank-Wolfe solver object (``init``/``step``/``remove_coordinates``); default
            built from ``cfg`` (``fw``, ``fw_step``, ``budget``, ``tau``, ``eps``, ``gap_tol``).
        metrics: a :class:`~debora.train.metrics.MetricsWriter` or ``None``.
    """

    def __init__(self, model, cfg, task: str, d1: Examples, d2: Examples, eval_examples: Examples,
                 device: torch.device, estimator=None, fw_solver=None, metrics=None,
                 callback: Optional[Callable[["Trainer", TrainState, Dict[str, Any]], None]] = None,
                 dist: Optional[distmod.Dist] = None):
        self.model, self.cfg, self.task = model, cfg, task
        self.dist = dist                       # None: one process
        self.world_size = dist.world_size if dist is not None else 1
        self.global_batch = cfg.batch_size * self.world_size
        self.ddp = None                        # DistributedDataParallel over the lower parameters
        self.est_state = None                  # the estimator's explicit state (warm start, RNG)
        self._test_nan = _test_hook("DEBORA_TEST_NAN")          # "rank:iteration" (tests only)
        self._test_exit = _test_hook("DEBORA_TEST_EXIT_AT")     # "iteration" (tests only)
        self.d1, self.d2, self.eval_examples = d1, d2, eval_examples
        self.device = torch.device(device)
        self.metrics = metrics
        self.callback = callback
        self.label_names: Optional[List[str]] = None   # class names (checkpoint: resume on the same data)
        est = estimator if estimator is not None else cfg.estimator
        opts = cfg.estimator_options if isinstance(est, str) else {}
        self.estimator = bilevel.estimators.get(est, **(opts or {}))
        self.estimator_name = est if isinstance(est, str) else type(est).__name__
        self._fw_solver = fw_solver
        self._user_fw = fw_solver is not None
        self._problem = None
        self._state_layout = None
        self.inputs_fn = inputs_fn(task)
        # D1 = D2 and the first-order estimator: by the envelope theorem ∇F(s) = ∂_s f(B*(s), s) at the
        # lower solution, and ∂_s f of the lower batches is a by-product of the lower backward passes
        self.fused = bool(cfg.fused_first_order) and estimator is None
        self.fused_grad = None
        use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        per_epoch = math.ceil(len(d2) / (self.global_batch * cfg.grad_accum * cfg.inner_steps))
        self.iterations_per_epoch = max(1, per_epoch)
        total = max(1, math.ceil(cfg.epochs * self.iterations_per_epoch))
        self.total_iterations = min(total, cfg.max_iterations) if cfg.max_iterations else total
        tf = cfg.truncate_from      # n0: an iteration, or a fraction of the planned iterations
        self.n0 = (max(1, math.ceil(tf * total)) if isinstance(tf, float) and 0 < tf < 1 else int(tf))
        if cfg.target_params is not None and cfg.target_params < self.smallest_adapter():
            raise ValueError(f"target_params={cfg.target_params} is below the smallest adapter this model can "
                             f"keep under budget={cfg.budget!r} ({self.smallest_adapter()} parameters: "
                             f"{'one component per adapter' if cfg.budget == 'per_layer' else 'one component'}); "
                             "raise target_params, adapt fewer modules (target_modules) or use budget='global'")

    # -- small helpers ----------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def batch(self, examples: Examples, idx) -> Dict[str, torch.Tensor]:
        """The device batch of the indices ``idx`` (a global batch: this rank's shard of it)."""
        weight = 1.0
        if self.dist is not None:
            idx, weight = distmod.shard(idx, self.dist.rank, self.dist.world_size)
        out = to_device(collate(examples, idx, self.cfg.image_size), self.device)
        if weight != 1.0:
            out[distmod.LOSS_WEIGHT] = torch.tensor(weight, device=self.device)
        return out

    def samplers(self):
        """The D1, D2 and estimator samplers, over global batches (N × batch_size)."""
        cfg, b = self.cfg, self.global_batch
        return (Sampler(len(self.d1), b, cfg.seed, stream=1), Sampler(len(self.d2), b, cfg.seed, stream=2),
                Sampler(len(self.d2), b, cfg.seed, stream=3))

    @functools.cached_property
    def layers(self) -> Dict[str, Any]:
        """``debora.adapter_layers(model)``, walked once: truncation, SVD cuts and refolds change the
        adapters' parameters in place, never which modules are adapters (a layer at rank 0 stays one)."""
        return debora.adapter_layers(self.model)

    def rewrap(self) -> None:
        """(Re)build the DDP wrapper over the current lower Parameters (after a truncation or a load:
        DDP's hooks stay on the Parameter objects it was built with)."""
        if self.dist is not None:
            # s is DDP's too when the lower optimizer trains it (learn_s)
            self.ddp = distmod.wrap(self.model, self.dist,
                                    [] if self.cfg.learn_s else list(debora.upper_parameters(self.model)))

    def s_tree(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in debora.upper_parameters(self.model).items()}

    def s_vector(self) -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1) for v in debora.upper_parameters(self.model).values()])

    def trained_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """What the lower AdamW trains: ``debora.lower_parameters`` (bases, head), and with ``learn_s``
        every adapter's s too (its magnitudes; they then require grad)."""
        params = debora.lower_parameters(self.model)
        if self.cfg.learn_s:
            ups = debora.upper_parameters(self.model)
            for p in ups.values():
                p.requires_grad_(True)
            params = {**params, **ups}
        return params

    def make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        params = self.trained_parameters()
        saved = tuple(n + "." for n in saved_modules(self.model))
        head = [p for n, p in params.items() if saved and n.startswith(saved)]
        body = [p for n, p in params.items() if not (saved and n.startswith(saved))]
        log_s = []
        if cfg.learn_log_s:     # s in a group of its own: AdamW on θ = log s, without weight decay
            names = set(debora.upper_parameters(self.model))
            log_s = [p for n, p in params.items() if n in names]
            body = [p for n, p in params.items() if n not in names and not (saved and n.startswith(saved))]
        groups = [{"params": body, "lr": cfg.lr}]
        if head:
            groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
        if log_s:
            groups.append({"params": log_s, "lr": cfg.lr, "weight_decay": 0.0, "log_s": True})
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor_at(self, step: int) -> float:
        """η_t / η at lower step ``step`` (lr_schedule.py) of this run's total_iterations × inner_steps."""
        cfg = self.cfg
        return lr_factor(cfg.lr_schedule, step, self.total_iterations * cfg.inner_steps, cfg.warmup)

    def set_lr(self, opt: torch.optim.Optimizer, step: int) -> None:
        """The lower lr of lower step ``step``: ``lr_factor`` × the configured lr of each group (bases,
        then the head); a function of the step only, so resume and truncation need no scheduler state."""
        cfg = self.cfg
        f = self.lr_factor_at(step)
        bases = iter((cfg.lr, cfg.head_lr or cfg.lr))
        for group in opt.param_groups:
            group["lr"] = (cfg.lr if group.get("log_s") else next(bases)) * f

    @property
    def fw_tau(self) -> float:
        """τ of the Frank-Wolfe set: the config's; with learn_s AdamW moves s off any simplex and the FW
        state only mirrors s for the budget's cuts, on a set that never binds."""
        return max(self.cfg.tau, _UNBOUNDED_TAU) if self.cfg.learn_s else self.cfg.tau

    def make_fw(self, layout: SLayout):
        if self._fw_solver is not None:
            return self._fw_solver
        cfg = self.cfg
        S = feasible_set(layout, self.fw_tau, cfg.eps, cfg.budget)
        # a constant step of 0 holds s (s_frozen from the start, see init_state): the rule is never used
        size = cfg.fw_step_size if cfg.fw_step_size > 0 else 1.0
        self._fw_solver = make_solver(cfg.fw, S, step_rule(cfg.fw_step, cfg.fw_lipschitz, size),
                                      cfg.gap_tol)
        return self._fw_solver

    # -- state ------------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        cfg = self.cfg
        ups = debora.upper_parameters(self.model)
        layout = SLayout(list(ups), [p.numel() for p in ups.values()])
        fw_solver = self.make_fw(layout)
        fw_state = fw_solver.init(self.s_vector())
        d1, d2, d2_est = self.samplers()
        held = cfg.s_held()     # s held at init_s: no FW steps
        return TrainState(iteration=0, fw_state=fw_state, optimizer=self.make_optimizer(), layout=layout,
                          d1=d1, d2=d2, d2_est=d2_est, s_frozen=held)

    # -- algorithm pieces -------------------------------------------------------------------------
    def lower_steps(self, state: TrainState, acc: Dict[str, torch.Tensor]) -> None:
        """T_max AdamW steps on f2 (D2 batches) for the bases and the head; s fixed."""
        cfg, model, opt = self.cfg, self.model, state.optimizer
        model.train()
        fused = self.fused and not state.s_frozen
        if fused:   # ∂_s f on the lower batches comes out of the same backward passes
            ups = debora.upper_parameters(model)
            for p in ups.values():
                p.grad = None
                p.requires_grad_(True)
        try:
            self._lower_loop(state, acc)
        finally:
            if fused:
                self.fused_grad = {k: (p.grad / cfg.inner_steps if p.grad is not None else torch.zeros_like(p))
                                   for k, p in ups.items()}
                for p in ups.values():
                    p.requires_grad_(False)
                    p.grad = None
        if fused and self.dist is not None:     # s is not DDP's: ∂_s f averaged here, one collective
            self.dist.mean_(list(self.fused_grad.values()))

    def _lower_loop(self, state: TrainState, acc: Dict[str, torch.Tensor]) -> None:
        cfg, model, opt = self.cfg, self.model, state.optimizer
        net = self.ddp if self.ddp is not None else model
        nan_here = (self._test_nan is not None and self.dist is not None
                    and self._test_nan == (self.dist.rank, state.iteration))
        for k in range(cfg.inner_steps):
            self.set_lr(opt, state.iteration * cfg.inner_steps + k)
            opt.zero_grad(set_to_none=True)
            total = None
            for j in range(cfg.grad_accum):
                batch = self.batch(self.d2, state.d2.next())
                # DDP: gradients are all-reduced on the last micro-batch only
                sync = self.ddp is None or j == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                    with self.autocast():
                        logits = forward(net, self.task, batch)
                        loss = loss_fn(logits, batch)
                    if nan_here:     # test hook: a NaN on this rank only
                        loss = loss * float("nan")
                    (loss / cfg.grad_accum).backward()
                total = loss.detach() if total is None else total + loss.detach()
                if float(batch.get(distmod.LOSS_WEIGHT, 1.0)) > 0:   # not a weight-0 filler shard
                    acc["correct"] += (logits.detach().argmax(-1) == batch["labels"]).sum()
                    acc["seen"] += batch["labels"].numel()
            total = total / cfg.grad_accum
            if self.dist is not None:   # the global loss: a NaN on any rank is a NaN on every rank
                total = total.float().reshape(1)
                self.dist.mean_([total])
                total = total.reshape(())
            if not bool(torch.isfinite(total)):
                state.skipped_lower += 1
                opt.zero_grad(set_to_none=True)
                self._nonfinite(state, f"lower loss is {total.item()} at iteration {state.iteration}")
                continue
            debora.project_gradients(model)
            if cfg.learn_log_s:
                log_space_step(opt, self.s_parameters)
            else:
                opt.step()
            debora.retract(model)
            if cfg.learn_s:     # the magnitudes stay on their floor's side, s >= ε (one fused op)
                with torch.no_grad():
                    torch._foreach_clamp_min_(self.s_parameters, cfg.eps)
            acc["lower_loss"] += total
            acc["lower_steps"] += 1

    def hypergradient(self, state: TrainState):
        """``(g, upper loss)``: the estimator on D1 batch(es) at the current (B, s); g averaged over
        ``grad_accum`` batches."""
        cfg = self.cfg
        if self._problem is None:   # built once (and after each truncation): it only holds the model
            self._problem = debora.bilevel_problem(self.model, loss_fn, inputs_fn=self.inputs_fn)[0]
            if self.dist is not None:   # gradients and products: means over the ranks
                self._problem = distmod.ReducedProblem(self._problem, self.dist)
        problem = self._problem
        # layers truncated to rank 0 (global budget) have empty s and bases: nothing to differentiate
        ups = debora.upper_parameters(self.model)
        x = {k: v.detach() for k, v in ups.items() if v.numel()}
        y = {k: v.detach() for k, v in debora.lower_parameters(self.model).items() if v.numel()}
        lower_iter = _Batches(self, state.d2_est, self.d2)
        g_sum, value, info = None, None, None
        stateful = isinstance(self.estimator, bilevel.estimators.Estimator)
        if stateful and self.est_state is None:
            self.est_state = self.estimator.init(x, y)
        with eval_mode(self.model):
            for _ in range(cfg.grad_accum):
                upper_batch = self.batch(self.d1, state.d1.next())
                with self.autocast():
                    if stateful:   # explicit state (CG warm start, stochastic-neumann RNG): checkpointed
                        res = self.estimator(problem, x, y, upper_batch, lower_iter, state=self.est_state)
                        self.est_state = res.state
                    else:
                        res = self.estimator(problem, x, y, upper_batch, lower_iter)
                g = {k: res.grad[k].float() for k in x}
                g_sum = g if g_sum is None else {k: g_sum[k] + g[k] for k in g}
                v = res.info.upper_value
                if v is not None:
                    value = v.detach().float() if value is None else value + v.detach().float()
                info = res.info
        g = {k: g_sum[k] / cfg.grad_accum if k in g_sum else torch.zeros_like(p, dtype=torch.float32)
             for k, p in ups.items()}
        if value is not None:
            value = value / cfg.grad_accum
        if self.dist is not None:   # g (and f1) averaged over the ranks before Frank-Wolfe
            g = self.dist.mean_tree(g)
            if value is not None:
                value = self.dist.mean_tree({"v": value.reshape(1)})["v"].reshape(())
        objective = None
        if cfg.fw_step == "armijo":      # f1 on the last D1 batch as a function of the s vector
            def objective(s_vec, _p=problem, _y=y, _b=upper_batch):
                lay = self._state_layout
                with eval_mode(self.model), torch.no_grad(), self.autocast():
                    val = _p.f({k: v.to(x[k].dtype) for k, v in lay.split(s_vec).items() if k in x},
                               _y, _b).float()
                if self.dist is not None:   # the global batch's f1: the same Armijo test on every rank
                    val = self.dist.mean_tree({"f": val.reshape(1)})["f"].reshape(())
                return val
        return g, value, objective

    @torch.no_grad()
    def write_s(self, s_vec: torch.Tensor, layout: SLayout) -> None:
        ups = debora.upper_parameters(self.model)
        for name, part in layout.split(s_vec).items():
            ups[name].copy_(part.to(ups[name].dtype).view_as(ups[name]))

    def fw_update(self, state: TrainState, g: Dict[str, torch.Tensor], objective=None):
        """One Frank-Wolfe step on s with the hypergradient ``g`` (skipped, counted, if g is not finite)."""
        if not _finite(g):
            state.skipped_upper += 1
            self._nonfinite(state, f"hypergradient has NaN/Inf at iteration {state.iteration}")
            return None
        fw_solver = self.make_fw(state.layout)
        if self.cfg.fw_step_schedule == "lr":
            # γ_n = γ × the lr factor at this iteration's last lower step: s settles as the lr decays
            # (Constant holds no state, so setting γ is all; γ_n = 0 at a warm-up's first step: no move)
            fw_solver.rule.gamma = self.cfg.fw_step_size * self.lr_factor_at(
                (state.iteration + 1) * self.cfg.inner_steps - 1)
        gvec = state.layout.flatten(g).to(state.fw_state.x.dtype)
        averaging = self.averaging
        if averaging is not None:   # the LMO sees d_n = (1 − ρ) d_{n−1} + ρ g_n (stochastic FW, Mokhtari et al.)
            gvec, state.grad_avg = averaging.update(gvec, state.grad_avg or averaging.init())
        s_new, fw_state, info = fw_solver.step(gvec, state.fw_state, objective=objective)
        state.last_gap = info.gap
        if self.cfg.gap_tol > 0:
            # the paper's step 4 (s stationary to tolerance p̃: stop updating it), on a stochastic gap:
            # one noisy small gap must not freeze s for the rest of the run, so it takes gap_patience
            # consecutive gaps <= p̃
            state.below_tol = state.below_tol + 1 if bool(info.stationary) else 0
            if state.below_tol >= self.cfg.gap_patience:
                state.s_frozen = True
        state.fw_state = fw_state
        self.write_s(s_new, state.layout)
        return info

    @functools.cached_property
    def averaging(self):
        """The FW gradient averaging (``fw_grad_averaging`` = ρ < 1), or None (ρ = 1: the gradient as is);
        built once (the config does not change during a run)."""
        rho = self.cfg.fw_grad_averaging
        return None if rho >= 1.0 else GradientAveraging(rho)

    def at_floor(self, state: TrainState) -> torch.Tensor:
        """Boolean mask over the s vector: components at the floor ε, as the FW solver sees them
        (exactly: their vertex has weight 0; or within ``truncate_atol`` if that is set)."""
        return self.make_fw(state.layout).at_floor(state.fw_state, atol=self.cfg.truncate_atol).cpu()

    @functools.cached_property
    def s_parameters(self) -> List[torch.nn.Parameter]:
        """Every adapter's s (the Parameter objects change at a truncation or a load: reset there)."""
        return list(debora.upper_parameters(self.model).values())

    def sync_fw_state(self, state: TrainState) -> None:
        """learn_s: the FW state's iterate (which the budget's cut and the truncation read) set to the
        s that AdamW moved."""
        x = self.s_vector().to(device=state.fw_state.x.device, dtype=state.fw_state.x.dtype)
        state.fw_state = self.make_fw(state.layout).init(x, feasible_set=state.fw_state.set)

    def truncate(self, state: TrainState) -> int:
        """Remove the components at the floor from the model (bases, s), the lower optimizer's state and
        the FW state (active set, weights), with the same global indices."""
        if self.cfg.learn_s:
            self.sync_fw_state(state)
        mask = self.at_floor(state).clone()
        x = state.fw_state.x.detach().cpu()
        # the FW set keeps >= 1 coordinate per block (per-layer budget) / overall (global budget)
        slices = ([slice(o, o + k) for o, k in zip(state.layout.offsets.values(), state.layout.sizes)]
                  if self.cfg.budget == "per_layer" else [slice(0, x.numel())])
        if self.has_budget:
            # the budget (count or parameters) decides how many go, s decides which: components at the
            # floor (smallest s) first, so they stay available to Frank-Wolfe until the schedule needs
            # their room
            mask = self.enforce_rank_budget(state, slices)
            x = state.fw_state.x.detach().cpu()
        for sl in slices:
            m = mask[sl]
            if m.numel() and bool(m.all()):
                m[int(torch.argmax(x[sl]))] = False
        if self.dist is not None:   # decided once (rank 0), checked by every rank
            mask = self.dist.decide(mask, f"the components to truncate at iteration {state.iteration}")
        if not bool(mask.any()):
            return 0
        idx = torch.nonzero(mask).flatten()
        # the adapters remove s_i <= ε: put exactly the selected entries there, the others above it
        eps = self.cfg.eps
        tmp = torch.where(mask, torch.full_like(x, eps), torch.clamp(x, min=2 * eps + 1e-6))
        self.write_s(tmp, state.layout)
        report = debora.truncate(self.model, atol=0.0, eps=eps, optimizer=state.optimizer)
        removed = {name + ".s": tr.removed for name, tr in report.items()}
        global_idx = torch.sort(state.layout.global_indices(removed)).values
        if not torch.equal(global_idx, idx):
            raise RuntimeError(f"truncation mismatch: the FW solver marks {idx.tolist()} at the floor but "
                               f"the adapters removed {global_idx.tolist()}")
        fw_solver = self.make_fw(state.layout)
        state.fw_state = fw_solver.remove_coordinates(state.fw_state, global_idx,
                                                      atol=self.cfg.truncate_atol)
        if state.grad_avg is not None:
            state.grad_avg = self.averaging.remove_coordinates(state.grad_avg, global_idx)
        state.layout.remove(removed)
        self.write_s(state.fw_state.x, state.layout)
        # a fresh problem: bilevel's Estimator re-validates a changed structure with lower_batch=None
        self._problem = None
        self.__dict__.pop("s_parameters", None)
        self.rewrap()   # new Parameters: DDP's hooks were on the old ones (pytorch#12603)
        return int(idx.numel())

    @property
    def has_budget(self) -> bool:
        """A budget the user set: ``target_rank`` (a count) or ``target_params`` (parameters)."""
        return self.cfg.target_params is not None or self.cfg.target_rank is not None

    def component_costs(self, layout: SLayout) -> torch.Tensor:
        """c_i of every live component, in s order: the parameters it costs (its s_i and one column of
        each basis; budget.py)."""
        layers = self.layers
        return torch.cat([torch.full((size,), float(layers[name[: -len(".s")]].component_numel()),
                                     dtype=torch.float64) for name, size in zip(layout.names, layout.sizes)]
                         ) if layout.names else torch.zeros(0, dtype=torch.float64)

    def smallest_adapter(self) -> int:
        """Adapter parameters when every adapter keeps one component (per-layer budget) or only the
        cheapest one does (global budget): the least ``target_params`` can reach."""
        costs = [layer.component_numel() for layer in self.layers.values()]
        return (sum(costs) if self.cfg.budget == "per_layer" else min(costs)) if costs else 0

    def rank_budget(self, iteration: int) -> int:
        """k(n): the live components allowed after ``iteration``, or with ``target_params`` P(n), the
        live adapter parameters allowed (budget.py; needs ``target_rank`` or ``target_params``)."""
        cfg = self.cfg
        layers = self.layers
        if cfg.target_params is not None:
            start = cfg.init_rank * sum(layer.component_numel() for layer in layers.values())
            return scheduled_count(iteration, self.total_iterations, start, int(cfg.target_params),
                                   cfg.prune_start, cfg.prune_end, cfg.prune_schedule)
        target = max(1, int(round(cfg.target_rank * len(layers))))
        return scheduled_count(iteration, self.total_iterations, cfg.init_rank * len(layers), target,
                               cfg.prune_start, cfg.prune_end, cfg.prune_schedule)

    def enforce_rank_budget(self, state: TrainState, slices) -> torch.Tensor:
        """The components beyond k(n) with the smallest s (budget.py); those not yet at the floor are
        moved there in the FW state (barycentric weights recomputed: they get weight exactly 0)."""
        k = self.rank_budget(state.iteration)
        x = state.fw_state.x.detach().cpu()
        alive = torch.ones_like(x, dtype=torch.bool)
        costs = self.component_costs(state.layout)
        per_param = self.cfg.target_params is not None
        if (float(costs.sum()) if per_param else int(alive.sum())) <= k:
            return torch.zeros_like(alive)
        fw_state = state.fw_state
        S = fw_state.set
        floor = S.floor(dtype=fw_state.x.dtype, device=fw_state.x.device)

        if self.cfg.prune_by == "svd" and self.cfg.svd_allocation in TAYLOR_KEYS:
            self.refresh_sensitivity(state)

        def choose(unfold: bool):
            key = x
            gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + state.iteration)   # resumable
            if self.cfg.prune_by == "random":    # ablation: the same count, components chosen at random
                key = torch.rand(x.shape, generator=gen, dtype=x.dtype)
            elif self.cfg.prune_by == "svd":     # σ of each layer's ΔW (descending): its cheapest cuts last
                key = self.singular_key(state.layout, unfold).to(x.dtype)
            else:                                # s, allocated over the layers by prune_allocation
                blocks = [slice(o, o + n) for o, n in zip(state.layout.offsets.values(), state.layout.sizes)]
                key = allocation_key(x, blocks, self.cfg.prune_allocation, costs)
            size = key if self.cfg.prune_by == "svd" else x   # what "largest" means for the protection
            protected = torch.zeros_like(alive)
            for sl in slices:                         # a block's largest live component always stays
                if x[sl].numel():
                    protected[sl.start + int(torch.argmax(size[sl]))] = True
            return key, smallest_beyond(key, alive, k, protected, generator=gen,
                                        cost=costs if per_param else None)

        def losing(force):
            offsets = state.layout.offsets
            return [name[: -len(".s")] for name, size in zip(state.layout.names, state.layout.sizes)
                    if size and bool(force[offsets[name]:offsets[name] + size].any())]

        unfold = self.cfg.prune_by == "svd" and self.cfg.svd_unfold
        key, force = choose(unfold)
        if not bool(force.any()):
            return force
        x_now = fw_state.x
        if self.cfg.prune_by == "svd":
            # the layers that lose components are re-factorised in their singular directions first,
            # so the cut components are the tail of each layer's SVD. Oblique/Stiefel layers are cut
            # in ΔW − ΔW0 (what training changed) and unfolded, unless the unfolded s = σ(ΔW − ΔW0)
            # would leave the Frank-Wolfe set (σ(ΔW − ΔW0) is not bounded by Σ s); then in ΔW
            # (folded: Σσ(ΔW) ≤ Σ s), with a warning.
            layers = self.layers
            names = losing(force)
            if unfold and any(layers[n].folded for n in names):
                # s after the cut: σ(ΔW − ΔW0) of each folded losing layer (or the refolded s0), the
                # floor for the removed components; the other layers' s as they are (Σσ(ΔW) ≤ Σs)
                cand = self.s_vector().to(x)
                offsets = state.layout.offsets
                for name, size in zip(state.layout.names, state.layout.sizes):
                    layer = layers[name[: -len(".s")]]
                    if name[: -len(".s")] in names and layer.folded and has_svd(layer):
                        sl = slice(offsets[name], offsets[name] + size)
                        new = debora.singular_values(layer, unfold=True).to(x).clamp_min(self.cfg.eps)
                        if self.cfg.refold_mode() != "off":
                            new = torch.full_like(new, self.refolded_s(int((~force[sl]).sum())))
                        cand[sl] = new
                cand = torch.where(force, floor.to(cand), cand)
                msg = S.feasibility_error(cand.to(fw_state.x), name="s after the cut")
                if msg is not None:
                    if not getattr(self, "_warned_fold", False):
                        self._warned_fold = True
                        warnings.warn(f"prune_by='svd': cutting ΔW − ΔW0 would leave the budget ({msg}); "
                                      "cutting ΔW instead (the folded ΔW0 stays). Raise tau to cut what "
                                      "training changed", RuntimeWarning, stacklevel=2)
                    unfold = False
                    key, force = choose(False)
            debora.svd_refactor(self.model, losing(force), optimizer=state.optimizer, unfold=unfold)
            if self.cfg.refold_mode() != "off":   # survivors' s reset, the difference folded into W
                offsets = state.layout.offsets
                for name, size in zip(state.layout.names, state.layout.sizes):
                    layer = layers[name[: -len(".s")]]
                    if size and layer.basis != "euclidean" and not layer.folded and has_svd(layer):
                        keep = ~force[offsets[name]:offsets[name] + size]
                        refold_magnitudes_(layer, keep, self.refolded_s(int(keep.sum())), self.cfg.init_rank)
            x_now = self.s_vector().to(device=fw_state.x.device, dtype=fw_state.x.dtype)
            state.grad_avg = None     # re-factorised components: their averaged ∂_s f no longer applies
        x_new = torch.where(force.to(fw_state.x.device), floor, x_now)
        fresh = self.make_fw(state.layout).init(x_new, feasible_set=S)
        state.fw_state = dataclasses.replace(fw_state, x=fresh.x, weights=fresh.weights)
        return force

    def refresh_sensitivity(self, state: TrainState) -> None:
        """What the Taylor keys project the components on (sensitivity.py), from ``taylor_batches`` D1
        batches (dropout off), kept until ``taylor_refresh`` of the run has passed; the first cut computes
        it: Ḡ_ℓ = ∂f1/∂W_ℓ ("taylor"), or the Kronecker factors (A_ℓ, S_ℓ) of the per-example Fisher
        ("fisher"). Not in the checkpoint: a resumed run recomputes it at its first cut."""
        cfg = self.cfg
        cached = getattr(self, "_sensitivity", None)
        every = max(1, int(round(cfg.taylor_refresh * self.total_iterations)))
        if cached is not None and state.iteration - cached["iteration"] < every:
            return
        model = self.model
        # taylor_batches batches of the global size: grad_accum micro-batches each (as the lower steps)
        batches = (self.batch(self.d1, state.d1.next()) for _ in range(cfg.taylor_batches * cfg.grad_accum))

        def loss_of(batch):
            with self.autocast():
                return loss_fn(forward(model, self.task, batch), batch).float()
        statistics = TAYLOR_KEYS[cfg.svd_allocation][0]
        # dropout off; BatchNorm on its batches' statistics, as the recalibrated model is evaluated
        with eval_mode(model), batch_statistics(model):
            data = statistics(self.layers, batches, loss_of,
                              reduce=self.dist.mean_ if self.dist is not None else None)
        self._sensitivity = {"iteration": state.iteration, "data": data}

    def refolded_s(self, kept: int) -> float:
        """The s that ``refold_magnitudes`` gives each of a layer's ``kept`` survivors: init_s, or
        ("layer_total") the layer's initial Σs = r0·init_s shared among them."""
        s0 = float(self.cfg.init_s)
        if self.cfg.refold_mode() == "layer_total":
            s0 *= self.cfg.init_rank / max(kept, 1)
        return s0

    def singular_key(self, layout: SLayout, unfold: bool = False) -> torch.Tensor:
        """σ(ΔW)/scaling of every adapter (descending per layer; CP adapters with a kernel larger than
        1×1: their s), in s order; ``unfold``: σ(ΔW − ΔW0)/scaling of folded layers (their leading r)."""
        layers = self.layers
        chosen = [layers[name[: -len(".s")]] for name in layout.names]
        no_svd = [n for n, layer in zip(layout.names, chosen) if layer.rank and not has_svd(layer)]
        if no_svd and not getattr(self, "_warned_no_svd", False):
            self._warned_no_svd = True
            warnings.warn(f"prune_by='svd': {len(no_svd)} adapters have no SVD (CP adapters with a kernel "
                          f"larger than 1×1, e.g. {no_svd[0][:-2]!r}); they are ranked by their s, which is "
                          "not on the scale of the others' singular values. Leave them out of "
                          "target_modules or use prune_by='s'", RuntimeWarning, stacklevel=2)
        if self.cfg.svd_allocation in TAYLOR_KEYS:   # Taylor cost of the removal per parameter (sensitivity.py)
            data, cost = self._sensitivity["data"], TAYLOR_KEYS[self.cfg.svd_allocation][1]

            def taylor_key(name, layer):
                if not has_svd(layer):
                    return debora.singular_values(layer, unfold).cpu()
                if name not in data:      # not on the forward path of the loss: it contributes nothing
                    return torch.zeros(layer.rank, dtype=layer.s.dtype)
                return cost(layer, data[name], unfold).cpu() / layer.component_numel()
            return torch.cat([taylor_key(n[: -len(".s")], layer) for n, layer in zip(layout.names, chosen)]) \
                if chosen else torch.zeros(0)
        parts = [debora.singular_values(layer, unfold).cpu() for layer in chosen]
        if self.cfg.svd_allocation == "sigma2_per_param":   # energy kept per parameter of the component
            parts = [p ** 2 / layer.component_numel() if layer.rank else p for p, layer in zip(parts, chosen)]
        elif self.cfg.svd_allocation == "uniform":   # the highest-ranked layers' σ-tails first: equal ranks
            parts = [-torch.arange(layer.rank, dtype=p.dtype) + p / (1.0 + p) for p, layer in
                     zip(parts, chosen)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _nonfinite(self, state: TrainState, message: str) -> None:
        count = state.skipped_lower + state.skipped_upper
        warnings.warn(f"{message}: step skipped ({count} skipped so far, limit "
                      f"{self.cfg.max_nonfinite})", RuntimeWarning, stacklevel=3)
        if self.metrics is not None:
            self.metrics.write("nonfinite", iteration=state.iteration, message=message, count=count)
        if count > self.cfg.max_nonfinite:
            raise NonFiniteError(f"aborting: {count} steps had NaN/Inf values (limit max_nonfinite="
                                 f"{self.cfg.max_nonfinite}); lower the learning rate or check the data. "
                                 "The last good checkpoint (if any) is untouched")

    def recalibrate_bn(self) -> int:
        """BatchNorm running statistics recomputed on all of D2 for the current weights (every process
        runs all of D2, unsharded: the same statistics everywhere); returns the number of BatchNorm
        layers (0: none, nothing run). See :mod:`debora.train.batchnorm`."""
        if not self.cfg.recalibrate_bn:
            return 0
        ex, bs, task = self.d2, self.cfg.eval_batch_size, self.task
        batches = (to_device(collate(ex, range(i, min(len(ex), i + bs)), self.cfg.image_size), self.device)
                   for i in range(0, len(ex), bs))

        def run(model, batch):
            with self.autocast():
                forward(model, task, batch)
        return recalibrate_batchnorm(self.model, batches, run)

    @torch.no_grad()
    def evaluate(self, examples: Optional[Examples] = None) -> Dict[str, float]:
        ex = examples if examples is not None else self.eval_examples
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = len(ex)
        lo, hi = 0, n
        if self.dist is not None:   # this rank's contiguous part of the evaluation set
            bounds = [0] + [int(b) for b in np.cumsum([len(a) for a in np.array_split(np.arange(n),
                                                                                      self.world_size)])]
            lo, hi = bounds[self.dist.rank], bounds[self.dist.rank + 1]
        for start in range(lo, hi, self.cfg.eval_batch_size):
            idx = range(start, min(hi, start + self.cfg.eval_batch_size))
            batch = to_device(collate(ex, idx, self.cfg.image_size), self.device)
            with self.autocast():
                logits = forward(self.model, self.task, batch)
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            correct += (logits.argmax(-1) == batch["labels"]).sum()
        self.model.train(was_training)
        if self.dist is not None:   # sums of losses and of correct answers, not averaged accuracies
            totals = torch.stack([loss_sum.double(), correct.double()])
            self.dist.sum_([totals])
            loss_sum, correct = totals[0], totals[1]
        return {"eval_loss": float(loss_sum) / max(n, 1), "eval_acc": float(correct) / max(n, 1)}

    def counts(self) -> Dict[str, int]:
        lower = sum(p.numel() for p in debora.lower_parameters(self.model).values())
        upper = sum(p.numel() for p in debora.upper_parameters(self.model).values())
        adapters = sum(layer.adapter_numel() for layer in self.layers.values())
        return {"trainable": lower + upper, "adapter": adapters, "lower": lower, "upper": upper}

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, state: TrainState, path: str, wall: float) -> str:
        names = {id(p): n for n, p in self.trained_parameters().items()}
        model_tensors = {**{k: v.detach() for k, v in debora.upper_parameters(self.model).items()},
                         **{k: v.detach() for k, v in debora.lower_parameters(self.model).items()}}
        opt_tensors, opt_meta = {}, {"param_groups": [], "step_scalar": {}}
        for group in state.optimizer.param_groups:
            opt_meta["param_groups"].append({k: v for k, v in group.items() if k != "params"}
                                            | {"params": [names[id(p)] for p in group["params"]]})
            for p in group["params"]:
                for key, val in state.optimizer.state.get(p, {}).items():
                    if isinstance(val, torch.Tensor):
                        opt_tensors[f"{names[id(p)]}|{key}"] = val
                    else:
                        opt_meta["step_scalar"][f"{names[id(p)]}|{key}"] = val
        fw_tensors: Dict[str, torch.Tensor] = {}
        fw = state.fw_state   # FWState minus its feasible set (rebuilt from the layout on load)
        fw_fields = {f: getattr(fw, f) for f in ("x", "weights", "n", "rule_state")}
        fw_layout = ckpt.flatten_state(fw_fields, "fw", fw_tensors)
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.dist is not None:   # every rank's generators (dropout draws differ between ranks)
            for r, st in enumerate(self.dist.gather(torch.get_rng_state())):
                rng["torch_cpu" if r == 0 else f"torch_cpu_rank{r}"] = st
            if self.device.type == "cuda":
                for r, st in enumerate(self.dist.gather(torch.cuda.get_rng_state(self.device))):
                    rng[f"cuda_rank{r}"] = st
        elif torch.cuda.is_available():
            for i, st in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda_{i}"] = st
        est_tensors, est_meta = _estimator_state_out(self.est_state)
        meta = {"iteration": state.iteration, "fw_layout": fw_layout, "optimizer": opt_meta,
                "layout": state.layout.state_dict(), "ranks": debora.rank_pattern(self.model),
                # oblique/Stiefel layers whose ΔW0 was unfolded by an SVD cut (refactor.py)
                "unfolded": sorted(n for n, l in self.layers.items()
                                   if l.basis != "euclidean" and not l.folded),
                "samplers": {"d1": state.d1.state_dict(), "d2": state.d2.state_dict(),
                             "d2_est": state.d2_est.state_dict()},
                "skipped_lower": state.skipped_lower, "skipped_upper": state.skipped_upper,
                "s_frozen": state.s_frozen, "below_tol": state.below_tol,
                "last_gap": _maybe_float(state.last_gap), "elapsed": wall,
                "history": state.history, "config": self.cfg.to_dict(),
                "model_dtypes": {k: str(v.dtype) for k, v in model_tensors.items()},
                "world_size": self.world_size, "global_batch": self.global_batch,
                "estimator_state": est_meta}
        if self.label_names is not None:
            meta["labels"] = list(self.label_names)
        # ΔW0 folded into the weights (oblique/Stiefel): a fresh injection re-creates the same one from the
        # seed, but an SVD cut with refold_magnitudes folds another (refactor.refold_magnitudes_): those
        # layers' folded factors and base weights are saved (the weight exactly as it is)
        folded = {}
        for n, l in self.layers.items():
            if l.folded and l.refolded:
                folded.update({f"{n}.{b}0": t.detach() for b, t in l.init_factors().items()})
                folded[f"{n}.base_weight"] = l.weight_ref.detach()
        groups = {"model": model_tensors, "optimizer": opt_tensors, "fw": fw_tensors, "rng": rng,
                  "estimator": est_tensors, "folded": folded}
        if state.grad_avg is not None and state.grad_avg.d is not None:   # fw_grad_averaging's d_n, n
            groups["fw_avg"] = {"d": state.grad_avg.d.detach()}
            meta["fw_avg_n"] = int(state.grad_avg.n)
        if self.dist is None:
            return ckpt.save(path, groups, meta)
        # rank 0 writes; every rank learns whether it worked (no rank waits for a failed writer)
        error = None
        if self.dist.is_main:
            try:
                ckpt.save(path, groups, meta)
            except BaseException as err:   # noqa: BLE001 - re-raised below, on every rank
                error = err
        if self.dist.any(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 could not write the checkpoint {path!r} (its error is in its log)")
        return path

    def _restore_folds(self, meta, tensors, layers, path: str) -> None:
        """The checkpoint's folds onto this freshly injected model: layers an SVD cut unfolded
        (``meta["unfolded"]``) are unfolded, layers it refolded get their saved ΔW0 factors and base
        weight (the optional tensor group ``folded``); the others keep the seed's fold."""
        unfolded = meta.get("unfolded", [])
        if not isinstance(unfolded, list) or not all(isinstance(n, str) and n in layers for n in unfolded):
            raise ValueError(f"checkpoint {path!r} has unfolded={unfolded!r}: it must list adapter layers "
                             "of this model; the checkpoint is corrupted or from another model")
        for name in unfolded:             # the saved bases carry ΔW − ΔW0: undo this model's fold
            layers[name].unfold_()
        folded = tensors.get("folded", {})    # optional group: layers refolded by an SVD cut
        for key, t in folded.items():
            name, _, buf = key.rpartition(".")
            layer = layers.get(name)
            ok = layer is not None and name not in unfolded and layer.folded
            if ok:
                want = (layer.weight_ref.shape if buf == "base_weight" else
                        layer.init_factors()[buf[:-1]].shape if buf[-1:] == "0" and buf[:-1] in layer.basis_names
                        else None)
                ok = want is not None and t.shape == want
            if not ok:
                raise ValueError(f"checkpoint {path!r} has a folded tensor {key!r} of shape {tuple(t.shape)} "
                                 "that this model's adapters do not have; the checkpoint is corrupted or "
                                 "from another model")
        for name, layer in layers.items():
            want = [f"{name}.{b}0" for b in layer.basis_names] + [f"{name}.base_weight"]
            got = [k for k in want if k in folded]
            if not got:
                continue
            if len(got) != len(want):
                raise ValueError(f"checkpoint {path!r} has only {got} of {want}; the checkpoint is corrupted")
            ref = layer.weight_ref
            layer.refold_({b: folded[f"{name}.{b}0"].to(ref) for b in layer.basis_names},
                          weight=folded[f"{name}.base_weight"].to(ref))
            layer.refolded = True

    def load_checkpoint(self, path: str, loaded=None) -> TrainState:
        """The state saved at ``path`` (``loaded``: its ``ckpt.load`` result, if already read), after
        checking it against this model and data (:func:`debora.train.resume.check_state`)."""
        tensors, meta = loaded if loaded is not None else ckpt.load(path)
        resume_checks.check_state(meta, tensors, path, upper=list(debora.upper_parameters(self.model)),
                                  lower=list(self.trained_parameters()),
                                  split_sizes={"d1": len(self.d1), "d2": len(self.d2),
                                               "d2_est": len(self.d2)},
                                  label_names=self.label_names)
        layout = SLayout.from_state(meta["layout"])
        fw_fields = ckpt.unflatten_state(meta["fw_layout"], tensors["fw"], device=self.device,
                                         where=f"{path}/state.json fw_layout")
        S = feasible_set(layout, self.fw_tau, self.cfg.eps, self.cfg.budget)
        resume_checks.check_fw(fw_fields, S, layout, tensors["model"], path)
        # adapters back to the saved ranks, then the saved values
        layers = self.layers
        for name, r in meta["ranks"].items():
            if name not in layers:
                raise ValueError(f"checkpoint {path!r} has an adapter {name!r} that this model lacks; "
                                 "resume with the same model and target modules")
            if layers[name].rank != r:
                layers[name].empty_(int(r))
        self._restore_folds(meta, tensors, layers, path)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in tensors["model"].items():
                if k not in params:
                    raise ValueError(f"checkpoint tensor {k!r} does not match any parameter of the model")
                if params[k].shape != v.shape:
                    raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(v.shape)}, the model "
                                     f"{tuple(params[k].shape)}")
                params[k].copy_(v.to(params[k].device))
        optimizer = self.make_optimizer()
        self.__dict__.pop("s_parameters", None)
        named = self.trained_parameters()
        if len(meta["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"checkpoint {path!r} has {len(meta['optimizer']['param_groups'])} optimizer "
                             f"parameter groups, this run {len(optimizer.param_groups)}")
        for g, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
            for k, v in saved.items():
                if k != "params" and k in g:   # only hyperparameters this optimizer has
                    g[k] = tuple(v) if isinstance(g[k], tuple) and isinstance(v, list) else v
        for key, val in tensors["optimizer"].items():
            pname, field_ = key.split("|", 1)
            optimizer.state[named[pname]][field_] = val.to(named[pname].device)
        for key, val in meta["optimizer"]["step_scalar"].items():
            pname, field_ = key.split("|", 1)
            optimizer.state[named[pname]][field_] = val
        if not self._user_fw:
            self._fw_solver = None      # rebuilt for the checkpoint's (possibly truncated) layout
        from bilevel.frank_wolfe import FWState
        fw_state = FWState(set=S, **fw_fields)
        self.make_fw(layout)
        d1, d2, d2_est = self.samplers()
        state = TrainState(iteration=int(meta["iteration"]), fw_state=fw_state, optimizer=optimizer,
                           layout=layout, d1=d1, d2=d2, d2_est=d2_est,
                           skipped_lower=int(meta["skipped_lower"]), skipped_upper=int(meta["skipped_upper"]),
                           s_frozen=bool(meta["s_frozen"]), below_tol=int(meta.get("below_tol", 0)),
                           last_gap=meta["last_gap"],
                           elapsed=float(meta["elapsed"]), history=dict(meta["history"]))
        state.d1.load_state_dict(meta["samplers"]["d1"])
        state.d2.load_state_dict(meta["samplers"]["d2"])
        state.d2_est.load_state_dict(meta["samplers"]["d2_est"])
        self.est_state = _estimator_state_in(meta.get("estimator_state"), tensors.get("estimator", {}),
                                             set(named), self.device, path)
        state.grad_avg = _averaging_state_in(meta, tensors.get("fw_avg"), layout.total, fw_state.x, path)
        rank = self.dist.rank if self.dist is not None else 0
        key = "torch_cpu" if rank == 0 else f"torch_cpu_rank{rank}"
        saved_world = meta.get("world_size", 1)
        if saved_world == self.world_size and key in tensors["rng"]:
            try:
                torch.set_rng_state(tensors["rng"][key])
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"{path}/rng.safetensors: invalid CPU RNG state ({err})") from None
        # (another number of processes: resume.check_world_size has made sure that no draw of the
        # global generators (dropout) matters; the samplers and estimator generators are restored)
        if self.device.type == "cuda" and self.dist is not None:
            if f"cuda_rank{rank}" in tensors["rng"] and saved_world == self.world_size:
                torch.cuda.set_rng_state(tensors["rng"][f"cuda_rank{rank}"], self.device)
        elif torch.cuda.is_available():
            states = [tensors["rng"][k] for k in sorted(tensors["rng"])
                      if k.startswith("cuda_") and not k.startswith("cuda_rank")]
            if states:
                torch.cuda.set_rng_state_all(states)
        return state

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, state: Optional[TrainState] = None, checkpoint_path: Optional[str] = None,
              progress: bool = True) -> TrainState:
        cfg = self.cfg
        if state is None:
            state = self.init_state()
        t0 = time.perf_counter() - state.elapsed
        self.rewrap()
        if state.iteration == 0 and "eval_start" not in state.history:
            self.recalibrate_bn()
            ev = self.evaluate()
            state.history["eval_start"] = ev
            state.history["counts_start"] = self.counts()
            state.history["ranks_start"] = debora.rank_pattern(self.model)
            if self.metrics is not None:
                self.metrics.write("eval", iteration=0, epoch=0.0, **ev, **self.counts(),
                                   time=time.perf_counter() - t0)
        bar = None
        if progress and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_iterations, initial=state.iteration, desc="dEBORA", unit="it",
                       dynamic_ncols=True)
        zero = lambda dt=torch.float32: torch.zeros((), device=self.device, dtype=dt)  # noqa: E731
        acc = {"correct": zero(torch.long), "seen": 0, "lower_loss": zero(), "lower_steps": 0,
               "upper_loss": zero(), "upper_n": 0}
        info = None
        try:
            while state.iteration < self.total_iterations:
                n = state.iteration
                # 1. lower level
                self.lower_steps(state, acc)
                # 2.–6. hypergradient and Frank-Wolfe step on s
                if not state.s_frozen:
                    self._state_layout = state.layout
                    if self.fused:
                        g, value, objective = self.fused_grad, None, None
                    else:
                        g, value, objective = self.hypergradient(state)
                    if value is not None:
                        acc["upper_loss"] += value
                        acc["upper_n"] += 1
                    info = self.fw_update(state, g, objective)
                state.iteration = n + 1
                if self.dist is not None:   # skip and freeze decisions, s: the same on every rank
                    self.dist.agree([state.skipped_lower, state.skipped_upper, float(state.s_frozen),
                                     state.below_tol, float(state.fw_state.x.double().sum())],
                                    f"skipped steps, s frozen, gaps below p̃ and sum(s) at iteration "
                                    f"{state.iteration}")
                # parameters after this iteration's optimizer and FW steps: one fused finite check
                bad = nonfinite_parameters(self.model)
                if self.dist is not None and self.dist.any(bool(bad)) and not bad:
                    bad = ["(on another process)"]
                if bad:
                    raise NonFiniteError(
                        f"aborting at iteration {state.iteration}: {len(bad)} parameter tensors hold NaN/Inf "
                        f"after the optimizer step (e.g. {bad[:3]}); lower the learning rate (lr="
                        f"{cfg.lr}, head_lr={cfg.head_lr}) or check the data. Nothing non-finite was "
                        "saved: the last checkpoint (if any) is untouched")
                # 7. truncation from n0 on
                removed = 0
                if (self.n0 >= 0 and state.iteration >= self.n0
                        and (state.iteration - self.n0) % cfg.truncate_every == 0):
                    removed = self.truncate(state)
                last = state.iteration == self.total_iterations
                if state.iteration % cfg.log_every == 0 or last or removed:
                    rec = self._log(state, acc, info, removed, time.perf_counter() - t0)
                    acc = {"correct": zero(torch.long), "seen": 0, "lower_loss": zero(), "lower_steps": 0,
                           "upper_loss": zero(), "upper_n": 0}
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['lower_loss']:.3f}" if rec["lower_loss"] is not None else "nan",
                                        acc=f"{rec['train_acc']:.3f}" if rec["train_acc"] is not None else "-",
                                        gap=f"{rec['fw_gap']:.2e}" if rec["fw_gap"] is not None else "-",
                                        rank=rec["total_rank"], refresh=False)
                if (cfg.eval_every and state.iteration % cfg.eval_every == 0) or last:
                    self.recalibrate_bn()
                    ev = self.evaluate()
                    if not math.isfinite(ev["eval_loss"]):   # finite parameters, non-finite outputs
                        raise NonFiniteError(
                            f"aborting at iteration {state.iteration}: the evaluation loss is "
                            f"{ev['eval_loss']} (the model's outputs overflow); lower the learning rate (lr="
                            f"{cfg.lr}, head_lr={cfg.head_lr}). Nothing non-finite was saved: the last "
                            "checkpoint (if any) is untouched")
                    best = state.history.get("eval_best")
                    if best is None or ev["eval_acc"] > best["eval_acc"]:
                        state.history["eval_best"] = dict(ev, iteration=state.iteration)
                    state.history["eval_end"] = ev
                    if self.metrics is not None:
                        self.metrics.write("eval", iteration=state.iteration, epoch=state.d2.progress, **ev,
                                           **self.counts(), time=time.perf_counter() - t0)
                    if bar is not None:
                        bar.write(f"[it {state.iteration}] eval loss {ev['eval_loss']:.4f} "
                                  f"acc {100 * ev['eval_acc']:.2f}%  rank {sum(debora.rank_pattern(self.model).values())}")
                if checkpoint_path and ((cfg.checkpoint_every and state.iteration % cfg.checkpoint_every == 0)
                                        or last):
                    self.save_checkpoint(state, checkpoint_path, time.perf_counter() - t0)
                    if self._test_exit is not None and self._test_exit == (state.iteration,):
                        os._exit(17)   # test hook: killed right after this checkpoint
                if bar is not None:
                    bar.update(1)
                if self.callback is not None:
                    self.callback(self, state, {"info": info, "removed": removed})
        finally:
            if bar is not None:
                bar.close()
        state.elapsed = time.perf_counter() - t0
        return state

    def _log(self, state: TrainState, acc, info, removed: int, wall: float) -> Dict[str, Any]:
        if self.dist is not None:   # training accuracy over the global batches (the loss already is)
            counts = torch.stack([acc["correct"].double().reshape(()),
                                  torch.tensor(float(acc["seen"]), dtype=torch.float64, device=self.device)])
            self.dist.sum_([counts])
            acc = dict(acc, correct=counts[0], seen=int(counts[1].item()))
        ranks = debora.rank_pattern(self.model)
        s = {k[:-2]: [round(float(x), 6) for x in v.detach().float().cpu()]
             for k, v in debora.upper_parameters(self.model).items()}
        ids = {k[:-2]: list(v) for k, v in state.layout.ids.items()}
        rec = {
            "iteration": state.iteration, "epoch": round(state.d2.progress, 4),
            "lower_loss": float(acc["lower_loss"]) / acc["lower_steps"] if acc["lower_steps"] else None,
            "upper_loss": float(acc["upper_loss"]) / acc["upper_n"] if acc["upper_n"] else None,
            "train_acc": float(acc["correct"]) / acc["seen"] if acc["seen"] else None,
            "fw_gap": _maybe_float(state.last_gap),
            "fw_kind": (info.kind_counts if hasattr(info, "kind_counts") else getattr(info, "kind", None))
            if info is not None else None,
            "fw_step": _maybe_float(info.step_size.max()) if info is not None else None,
            "active_set": _maybe_float(info.active_set_size) if info is not None else None,
            "s_frozen": state.s_frozen, "removed": removed, "total_rank": sum(ranks.values()),
            "ranks": ranks, "s": s, "s_ids": ids, **self.counts(),
            "skipped": state.skipped_lower + state.skipped_upper, "time": round(wall, 3),
        }
        if self.metrics is not None:
            self.metrics.write("train", **rec)
        return rec


def _averaging_state_in(meta, group, total: int, x: torch.Tensor, path: str):
    """The averaged FW gradient (d_n, n) of a checkpoint, checked against the s layout; None if it has none."""
    n = meta.get("fw_avg_n")
    if group is None and n is None:
        return None
    where = os.path.join(path, "state.json")
    if group is None or set(group) != {"d"}:
        raise ValueError(f"{where} has fw_avg_n but fw_avg.safetensors lacks the tensor 'd' (or has others); "
                         "the checkpoint is corrupted or edited")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: fw_avg_n must be an integer >= 1, got {n!r}")
    d = group["d"]
    if d.shape != (total,) or not d.is_floating_point() or not bool(torch.isfinite(d).all()):
        raise ValueError(f"{os.path.join(path, 'fw_avg.safetensors')}: d must be a finite float vector of "
                         f"shape ({total},) (the s layout), got shape {tuple(d.shape)}; the checkpoint is "
                         "corrupted or edited")
    return AveragingState(d=d.to(device=x.device, dtype=x.dtype), n=n)


def _estimator_state_out(state):
    """``(tensors, meta)`` of an :class:`bilevel.estimators.EstimatorState` (``({}, None)`` for none):
    the warm start as ``warm|<name>`` tensors, the generator state as ``rng``, counters in JSON."""
    if state is None:
        return {}, None
    d = state.to_dict()
    tensors = {f"warm|{k}": v.detach() for k, v in (d["warm"] or {}).items()}
    if d["rng"] is not None:
        tensors["rng"] = d["rng"]
    meta = {"step": d["step"], "iterations": d["iterations"],
            "warm": None if d["warm"] is None else sorted(d["warm"]), "rng": d["rng"] is not None}
    return tensors, meta


def _estimator_state_in(meta, tensors, lower_names, device, path):
    """The estimator state saved by :func:`_estimator_state_out`, checked (``None`` if none was saved)."""
    if meta is None:
        return None
    where = f"{path}/state.json estimator_state"
    if not isinstance(meta, dict) or set(meta) != {"step", "iterations", "warm", "rng"}:
        raise ValueError(f"{where}: must be an object with step, iterations, warm, rng; the checkpoint is "
                         "corrupted or edited")
    warm = meta["warm"]
    if warm is not None and not (isinstance(warm, list) and all(isinstance(k, str) for k in warm)):
        raise ValueError(f"{where}: 'warm' must be a list of parameter names or null")
    d = {"step": meta["step"], "iterations": meta["iterations"], "warm": None, "rng": None}
    if warm is not None:
        unknown = [k for k in warm if k not in lower_names]
        missing = [k for k in warm if f"warm|{k}" not in tensors]
        if unknown or missing:
            raise ValueError(f"{where}: the warm start names {unknown or missing} that are not "
                             "lower-level parameters of this model or not in estimator.safetensors; the "
                             "checkpoint is corrupted or edited")
        d["warm"] = {k: tensors[f"warm|{k}"].to(device) for k in warm}
    if meta["rng"] is True:
        if "rng" not in tensors:
            raise ValueError(f"{where}: the generator state is missing from estimator.safetensors")
        d["rng"] = tensors["rng"]
    try:
        return bilevel.estimators.EstimatorState.from_dict(d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}; the checkpoint is corrupted or edited") from None


def _test_hook(name: str):
    """A test hook from the environment: ``"a:b"`` -> ``(a, b)`` (ints), or ``None`` when unset."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return tuple(int(v) for v in raw.split(":"))
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected integers separated by ':' (a test hook)") from None


def _maybe_float(v):
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
