"""The one interface every hypergradient estimator implements.

    est = bilevel.estimators.get(name, **options)
    res = est(problem, x, y, upper_batch, lower_batch)
    res.grad   # dict like x: an estimate of ∇F(x) = ∂_x f − ∂²_xy g [∂²_yy g]⁻¹ ∂_y f at (x, y)
    res.info   # EstimatorInfo: HVP count, iterations, residual, wall time, ...

``y`` is taken as (an approximation of) the lower solution y*(x); estimators never re-solve it, except
``unrolled`` which differentiates through its own inner steps started at ``y``.

``lower_batch`` is a single batch (any object the losses accept), or an *iterator* of batches (an object
with ``__next__``, e.g. ``iter(loader)`` or :class:`bilevel.BatchStream`): stochastic estimators draw an
independent batch for each product; deterministic ones draw one batch and use it throughout. Lists and
tuples are treated as a single batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..problem import HVP_MODES, BilevelProblem
from ..pytree import Tree


@dataclass
class EstimatorInfo:
    """Diagnostics of one hypergradient evaluation."""

    hvp_count: int = 0            # ∂²_yy g · v products
    mixed_count: int = 0          # ∂²_xy g · v products
    iterations: int = 0           # solver / unrolling iterations
    residual: Optional[float] = None   # ‖H v − ∂_y f‖ / ‖∂_y f‖ of the linear solve, where defined
    residual_history: list = field(default_factory=list)
    wall_time: float = 0.0        # seconds (device-synchronised)
    upper_value: Optional[torch.Tensor] = None   # f(x, y, upper_batch), 0-dim tensor (no host sync)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HypergradResult:
    grad: Tree
    info: EstimatorInfo


def is_batch_iterator(obj: Any) -> bool:
    return hasattr(obj, "__next__")


def draw(lower_batch: Any) -> Any:
    """One batch: the next of an iterator, or the batch itself."""
    if isinstance(lower_batch, torch.utils.data.DataLoader):
        raise TypeError("lower_batch is a DataLoader, which is neither a batch nor an iterator of "
                        "batches; pass bilevel.BatchStream(loader) (endless) or one batch")
    if is_batch_iterator(lower_batch):
        try:
            return next(lower_batch)
        except StopIteration:
            raise ValueError("lower_batch iterator is exhausted; pass an endless iterator such as "
                             "bilevel.BatchStream(loader) or itertools.cycle(batches)") from None
    return lower_batch


def _sync(tree: Tree) -> None:
    for v in tree.values():
        if v.is_cuda:
            torch.cuda.synchronize(v.device)
        break


class Estimator:
    """Base class: subclasses implement :meth:`estimate`; ``__call__`` validates and times it."""

    name: str = "estimator"

    def __call__(self, problem: BilevelProblem, x: Tree, y: Tree, upper_batch: Any,
                 lower_batch: Any) -> HypergradResult:
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        if problem.needs_validation(x, y):
            first = draw(lower_batch)
            problem.validate(x, y, upper_batch, first)
            if is_batch_iterator(lower_batch):
                lower_batch = _Prepend(first, lower_batch)
        else:
            problem.validate(x, y, upper_batch, None)   # cheap: key checks only
        t0 = time.perf_counter()
        grad, info = self.estimate(problem, x, y, upper_batch, lower_batch)
        _sync(grad)
        info.wall_time = time.perf_counter() - t0
        return HypergradResult({k: grad[k] for k in x}, info)

    def estimate(self, problem, x, y, upper_batch, lower_batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class HvpModeOption:
    """Mixin: a validated ``hvp_mode`` attribute (see :class:`bilevel.LowerOperators`)."""

    _hvp_mode: str = "auto"

    @property
    def hvp_mode(self) -> str:
        return self._hvp_mode

    @hvp_mode.setter
    def hvp_mode(self, mode: str) -> None:
        if mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={mode!r} is not one of {HVP_MODES}")
        self._hvp_mode = mode

    def __repr__(self) -> str:
        opts = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        opts["hvp_mode"] = self.hvp_mode
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


class _Prepend:
    """An iterator that yields ``first`` and then continues with ``rest``."""

    def __init__(self, first, rest):
        self._first, self._rest, self._used = first, rest, False

    def __iter__(self):
        return self

    def __next__(self):
        if not self._used:
            self._used = True
            return self._first
        return next(self._rest)
