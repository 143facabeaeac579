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

Explicit state (optax style)::

    state = est.init(x, y)                                      # EstimatorState: plain data
    res = est(problem, x, y, upper_batch, lower_batch, state=state)
    state = res.state                                           # warm start, RNG, call count
    torch.save(state.to_dict(), path); state = EstimatorState.from_dict(torch.load(path))

Without ``state=`` the estimator carries its own state from call to call (the behaviour before explicit
state existed), so ``est(problem, x, y, upper_batch, lower_batch)`` keeps working unchanged.

Every call checks once (one host sync) that the hypergradient is finite; if not, it warns with the
values of both losses at (x, y) and sets ``info.finite = False`` and ``info.extra["nonfinite"]``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from .. import _checks as _c
from .. import pytree as pt
from ..problem import HVP_MODES, BilevelProblem, autocast_dtype, no_autocast
from ..pytree import Tree


@dataclass(frozen=True)
class EstimatorState:
    """What an estimator carries from one call to the next, as plain data.

    Attributes:
        step: number of calls made with this state.
        warm: the last linear-system solution ``v`` (a dict like y; CG / fixed-point warm starts).
        rng: the state of the estimator's CPU random generator (a uint8 tensor,
            ``torch.Generator.get_state()``; stochastic estimators only).
        iterations: solver iterations of the previous call (the ``materialize="auto"`` cost model).

    ``to_dict()`` gives ``{"step": int, "warm": dict[str, Tensor] | None, "rng": Tensor | None}``
    (tensors and ints only: ``torch.save``/safetensors-able, no pickled classes), and
    ``EstimatorState.from_dict`` inverts it.
    """

    step: int = 0
    warm: Optional[Dict[str, torch.Tensor]] = None
    rng: Optional[torch.Tensor] = None
    iterations: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"step": int(self.step), "warm": None if self.warm is None else dict(self.warm),
                "rng": self.rng, "iterations": int(self.iterations)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EstimatorState":
        unknown = sorted(set(d) - {"step", "warm", "rng", "iterations"})
        if unknown:
            raise ValueError(f"unknown EstimatorState fields {unknown}; expected step, warm, rng, "
                             "iterations")
        step = _c.integer("state['step']", d.get("step", 0), 0)
        warm = d.get("warm")
        if warm is not None:
            pt.check_tree(warm, "state['warm']")
        rng = d.get("rng")
        if rng is not None and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise TypeError(f"state['rng'] must be a uint8 tensor from torch.Generator.get_state(), "
                            f"got {type(rng).__name__}")
        return cls(step=step, warm=None if warm is None else dict(warm), rng=rng,
                   iterations=_c.integer("state['iterations']", d.get("iterations", 0), 0))


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
    finite: bool = True           # False when the hypergradient has a NaN/inf (see extra["nonfinite"])
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HypergradResult:
    grad: Tree
    info: EstimatorInfo
    state: Optional[EstimatorState] = None     # pass back as state= to continue (warm start, RNG)


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
    """Base class.

    Stateless estimators implement ``estimate(problem, x, y, upper_batch, lower_batch) -> (grad,
    info)``; estimators with state (warm starts, RNG) implement ``estimate_with_state(..., state) ->
    (grad, info, state)`` and ``init``. ``__call__`` validates, times, checks finiteness and threads the
    state through.
    """

    name: str = "estimator"
    #: the options :func:`bilevel.estimators.get` accepts (a tuple of names, for clear errors that name
    #: the accepted ones; ``None``: not declared, the constructor alone decides)
    options: Optional[tuple] = None

    def init(self, x: Tree, y: Tree) -> EstimatorState:
        """A fresh state for this estimator at ``(x, y)``."""
        return EstimatorState()

    def __call__(self, problem: BilevelProblem, x: Tree, y: Tree, upper_batch: Any,
                 lower_batch: Any, state: Optional[EstimatorState] = None) -> HypergradResult:
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        if state is not None and not isinstance(state, EstimatorState):
            raise TypeError(f"state must be a bilevel.estimators.EstimatorState (from est.init(x, y) or "
                            f"a previous result's .state), got {type(state).__name__}")
        if problem.needs_validation(x, y):
            first = draw(lower_batch)
            problem.validate(x, y, upper_batch, first)
            if is_batch_iterator(lower_batch):
                lower_batch = _Prepend(first, lower_batch)
        else:
            problem.validate(x, y, upper_batch, None)   # cheap: key checks only
        implicit = state is None
        if implicit:
            state = getattr(self, "_implicit_state", None) or self.init(x, y)
        t0 = time.perf_counter()
        grad, info, new_state = self.estimate_with_state(problem, x, y, upper_batch, lower_batch, state)
        grad = {k: grad[k] for k in x}
        low = autocast_dtype()
        if low is not None:
            info.extra["autocast"] = str(low)
        _sync(grad)
        info.wall_time = time.perf_counter() - t0
        self._check_finite(problem, x, y, upper_batch, lower_batch, grad, info)
        if implicit:
            self._implicit_state = new_state
        return HypergradResult(grad, info, new_state)

    def estimate_with_state(self, problem, x, y, upper_batch, lower_batch, state: EstimatorState):
        """Default for stateless estimators: :meth:`estimate`, and the call counted in the state."""
        grad, info = self.estimate(problem, x, y, upper_batch, lower_batch)
        return grad, info, EstimatorState(step=state.step + 1, warm=state.warm, rng=state.rng,
                                          iterations=info.iterations)

    def estimate(self, problem, x, y, upper_batch, lower_batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_finite(self, problem, x, y, upper_batch, lower_batch, grad, info) -> None:
        """One host sync: is every entry of the hypergradient finite? If not, diagnose and warn."""
        vals = [v.detach().reshape(-1) for v in grad.values()]
        if info.upper_value is not None:
            vals.append(info.upper_value.detach().reshape(-1).to(vals[0].dtype))
        if bool(torch.isfinite(torch.cat(vals) if len(vals) > 1 else vals[0]).all()):
            return
        info.finite = False
        bad = [k for k, v in grad.items() if not bool(torch.isfinite(v).all())]
        report = {"grad_keys": bad}
        try:
            report.update(problem.nonfinite_report(
                x, y, upper_batch, None if is_batch_iterator(lower_batch) else lower_batch))
        except Exception as err:  # pragma: no cover - diagnosis must not hide the warning
            report["diagnosis_error"] = repr(err)
        info.extra["nonfinite"] = report
        culprit = []
        if "upper_loss" in report and not _finite(report["upper_loss"]):
            culprit.append(f"the upper loss f(x, y, upper_batch) is {report['upper_loss']}")
        if "lower_loss" in report and not _finite(report["lower_loss"]):
            culprit.append(f"the lower loss g(x, y, lower_batch) is {report['lower_loss']}")
        if report.get("nonfinite_inputs"):
            culprit.append(f"the inputs {report['nonfinite_inputs']} are not finite")
        if not bad:
            bad = ["(none: the upper value f is not finite)"]
        why = "; ".join(culprit) or "the losses are finite at (x, y): a second-order product or the " \
            "linear solve overflowed (try damping > 0, a smaller eta, or float64)"
        warnings.warn(f"{self.name}: the hypergradient is not finite in {bad}: {why}. "
                      "res.info.finite is False and res.info.extra['nonfinite'] has the details",
                      RuntimeWarning, stacklevel=3)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


def check_damping(damping) -> float:
    """Tikhonov λ ≥ 0 (finite): the solve becomes ``(∂²_yy g + λI) v = ∂_y f``."""
    return _c.number("damping", damping, nonnegative=True,
                     hint=" (Tikhonov λ in (H + λI)v = b; 0 disables it)")


def check_eta(eta) -> float:
    return _c.number("eta", eta, positive=True, hint=" (the Neumann/Richardson step; take η ≤ 1/λ_max "
                                                     "of the lower Hessian)")


class HvpModeOption:
    """Mixin: a validated ``hvp_mode`` attribute (see :class:`bilevel.LowerOperators`)."""

    _hvp_mode: str = "auto"

    @property
    def hvp_mode(self) -> str:
        return self._hvp_mode

    @hvp_mode.setter
    def hvp_mode(self, mode: str) -> None:
        self._hvp_mode = _c.choice("hvp_mode", mode, HVP_MODES)

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
