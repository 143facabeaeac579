"""Several processes: ``torch.distributed`` under ``torchrun`` (one process per device).

    torchrun --nproc_per_node=N -m debora train --batch-size B …     # global batch N·B

What this module gives the trainer (and nothing else: the trainer decides *what* to reduce):

* :func:`setup` — the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), ``gloo`` on CPU and ``nccl`` on CUDA with the
  device ``cuda:LOCAL_RANK``; ``None`` for a plain single process (nothing changes then).
* :func:`shard` — rank r's part of a global batch of indices, and the weight that makes the mean of
  the ranks' losses the mean over the global batch (also for an uneven last batch).
* reductions over one flattened buffer per dtype (:meth:`Dist.mean_`, :meth:`Dist.sum_`), agreement
  checks (:meth:`Dist.agree`, :meth:`Dist.decide`), :meth:`Dist.gather` (the RNG states of a checkpoint);
* :func:`wrap` — ``DistributedDataParallel`` over the lower-level parameters (bases, head); the rank
  weights s are an upper variable and are left to the trainer. After a truncation the Parameters are
  new objects, and DDP keeps its hooks on the old ones (pytorch#12603): the trainer calls :func:`wrap`
  again;
* :class:`ReducedProblem` — a :class:`bilevel.BilevelProblem` whose upper gradients and Hessian /
  mixed products are means over the ranks. The losses are means over a batch and these quantities are
  linear in the batch, so every estimator that works through them (first-order, closed form, cg,
  neumann, fixed-point, exact, stochastic-neumann) computes on every rank exactly the hypergradient of
  the global batch, and its iterations (CG residuals, stopping) agree across ranks.

Test hooks (environment variables, read by the trainer; for the test suite, not for users):
``DEBORA_TEST_NAN="RANK:ITERATION"`` makes the lower loss NaN on that rank in that outer iteration;
``DEBORA_TEST_EXIT_AT=ITERATION`` ends every process with exit status 17 right after that
iteration's checkpoint (a kill at a known point). ``DEBORA_DIST_TIMEOUT`` (seconds, default 1800)
bounds every collective: a rank that stops answering fails the others instead of hanging them.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from bilevel import BilevelProblem

TIMEOUT_ENV = "DEBORA_DIST_TIMEOUT"
LOSS_WEIGHT = "loss_weight"        # batch key: rank weight N·n_r/n of an uneven shard (models.loss_fn)


@dataclass
class Dist:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (one per call, over one flattened buffer per dtype) ---------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _reduce_(self, tensors: Sequence[torch.Tensor], mean: bool) -> None:
        tensors = [t for t in tensors if t.numel()]
        by_dtype: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for group in by_dtype.values():
            flat = _flatten_dense_tensors([t.detach() for t in group]).to(self._comm_device())
            dist.all_reduce(flat)
            if mean:
                flat /= self.world_size
            for t, r in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(r)

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: each tensor becomes its mean over the ranks."""
        self._reduce_(tensors, mean=True)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: each tensor becomes its sum over the ranks."""
        self._reduce_(tensors, mean=False)

    def mean_tree(self, tree: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {k: v.detach().clone() for k, v in tree.items()}
        self.mean_(list(out.values()))
        return out

    def agree(self, values: Sequence[float], what: str) -> None:
        """Raise (on every rank) unless every rank holds the same ``values``."""
        v = torch.tensor([float(x) for x in values], dtype=torch.float64, device=self._comm_device())
        lo, hi = v.clone(), v.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"the {self.world_size} processes disagree on {what}: rank {self.rank} has "
                               f"{v.tolist()}, the minimum over ranks is {lo.tolist()} and the maximum "
                               f"{hi.tolist()}; this is a bug (please report it with the command line)")

    def decide(self, mask: torch.Tensor, what: str) -> torch.Tensor:
        """Rank 0's ``mask`` (broadcast); every rank checks that its own equals it."""
        mine = mask.to(torch.uint8).to(self._comm_device())
        chosen = mine.clone()
        dist.broadcast(chosen, src=0)
        differs = torch.tensor([float(not torch.equal(chosen, mine))], dtype=torch.float64,
                               device=self._comm_device())
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if float(differs) > 0:
            raise RuntimeError(f"the processes disagree on {what} (rank {self.rank}: "
                               f"{torch.nonzero(mine).flatten().tolist()}, rank 0: "
                               f"{torch.nonzero(chosen).flatten().tolist()}); this is a bug")
        return chosen.to(mask.device).bool()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on all ranks), in rank order, on every rank."""
        src = t.detach().to(self._comm_device()).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(out, src)
        return [o.to(t.device) for o in out]

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer; launch "
                         "several processes with torchrun") from None


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds > 0")
    return value


def setup(device_name: str) -> Optional[Dist]:
    """The process group of this torchrun process (initialised here if needed), or ``None`` for a
    single process. ``device_name``: ``auto``/``cuda`` (→ ``cuda:LOCAL_RANK`` when CUDA is there) or
    ``cpu``; an explicit ``cuda:N`` is refused with several processes (each uses its own device)."""
    if not dist.is_available():
        if env_world_size() > 1:
            raise ValueError("torch.distributed is not available in this torch build; run one process")
        return None
    if not dist.is_initialized() and env_world_size() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda:"):
        raise ValueError(f"device={device_name!r}: with several processes each one uses cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto)")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available; use --device cpu or auto")
    if want_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             "devices; start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()),
                                **({"device_id": device} if device.type == "cuda" else {}))
    backend = dist.get_backend()
    if dist.get_world_size() <= 1:
        return None
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                backend=str(backend), device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(idx: Sequence[int], rank: int, world_size: int) -> Tuple[List[int], float]:
    """Rank ``rank``'s contiguous part of the global batch ``idx`` and its loss weight ``N·n_r/n``.

    Each rank's loss is the mean over its part; DDP and :class:`ReducedProblem` average over ranks, so
    weighting rank r's loss by ``N·n_r/n`` makes the average the mean over the whole global batch (the
    weight is exactly 1 for equal parts, the usual case). A global batch smaller than N (the last one
    of an epoch) leaves some ranks without examples: they run one example with weight 0."""
    idx = list(idx)
    n = len(idx)
    parts = np.array_split(np.arange(n), world_size)
    mine = [idx[i] for i in parts[rank].tolist()]
    if not mine:
        return [idx[0]], 0.0
    return mine, world_size * len(mine) / n


def wrap(model: torch.nn.Module, d: Dist, upper_names: Sequence[str]):
    """``DistributedDataParallel(model)`` syncing the gradients of the lower-level parameters; the
    parameters named in ``upper_names`` (s) are ignored: the trainer reduces ∂_s f itself. Call it
    again after any change of the Parameter objects (truncation, loading a checkpoint)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    names = [n for n, p in model.named_parameters() if n in set(upper_names) or
             (p.requires_grad and p.numel() == 0)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
               broadcast_buffers=False, find_unused_parameters=False)


class _ReducedOps:
    """:class:`bilevel.problem.LowerOperators` whose products are means over the ranks."""

    def __init__(self, ops, d: Dist):
        self._ops, self._d = ops, d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def _mean(self, tree):
        return self._d.mean_tree(tree)

    def grad_y(self):
        return self._mean(self._ops.grad_y())

    def hvp(self, v):
        return self._mean(self._ops.hvp(v))

    def hvp_batched(self, V):
        return self._mean(self._ops.hvp_batched(V))

    def mixed(self, v):
        return self._mean(self._ops.mixed(v))

    def hvp_and_mixed(self, v):
        h, m = self._ops.hvp_and_mixed(v)
        both = self._mean({**{"h|" + k: t for k, t in h.items()}, **{"m|" + k: t for k, t in m.items()}})
        return ({k: both["h|" + k] for k in h}, {k: both["m|" + k] for k in m})


class ReducedProblem(BilevelProblem):
    """``problem`` with its batch-linear quantities averaged over the ranks (module doc).

    Everything else (the losses themselves, validation) is the wrapped problem's, per rank: an
    estimator that differentiates the losses directly (``unrolled``) gets a per-rank result, which the
    trainer then averages."""

    def __init__(self, problem: BilevelProblem, d: Dist):   # noqa: D107 (no dataclass init: a view)
        object.__setattr__(self, "_inner", problem)
        object.__setattr__(self, "_d", d)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def f(self, x, y, batch):
        return self._inner.f(x, y, batch)

    def g(self, x, y, batch):
        return self._inner.g(x, y, batch)

    def needs_validation(self, x, y):
        return self._inner.needs_validation(x, y)

    def validate(self, x, y, upper_batch, lower_batch):
        return self._inner.validate(x, y, upper_batch, lower_batch)

    def nonfinite_report(self, x, y, upper_batch, lower_batch):
        return self._inner.nonfinite_report(x, y, upper_batch, lower_batch)

    def upper_grads(self, x, y, batch):
        gx, gy, value = self._inner.upper_grads(x, y, batch)
        tree = {**{"x|" + k: v for k, v in gx.items()}, **{"y|" + k: v for k, v in gy.items()},
                "value": value.detach().reshape(1)}
        out = self._d.mean_tree(tree)
        return ({k: out["x|" + k] for k in gx}, {k: out["y|" + k] for k in gy},
                out["value"].reshape(value.shape))

    def operators(self, x, y, batch, hvp_mode: str = "auto"):
        return _ReducedOps(self._inner.operators(x, y, batch, hvp_mode), self._d)
