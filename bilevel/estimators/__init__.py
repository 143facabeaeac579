"""Hypergradient estimators behind one interface, looked up by name.

    >>> est = bilevel.estimators.get("cg", tol=1e-8)
    >>> res = est(problem, x, y, upper_batch, lower_batch)
    >>> bilevel.estimators.available()
    ['cg', 'exact', 'first-order', 'fixed-point', 'neumann', 'stochastic-neumann', 'unrolled']

New estimators register with :func:`register` (``import debora`` adds ``debora-closed-form``).
"""
from __future__ import annotations

from typing import Callable, Dict, List

from .base import Estimator, EstimatorInfo, EstimatorState, HypergradResult, draw, is_batch_iterator
from .first_order import FirstOrder
from .implicit import ConjugateGradient, Exact, FixedPoint, ImplicitEstimator, Neumann
from .stochastic import StochasticNeumann
from .unrolled import Unrolled

_REGISTRY: Dict[str, Callable[..., Estimator]] = {}


def register(name: str, factory: Callable[..., Estimator], overwrite: bool = False) -> None:
    """Make ``factory(**options)`` available as ``get(name, **options)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"estimator name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"an estimator named {name!r} is already registered; pass overwrite=True "
                         "to replace it")
    _REGISTRY[name] = factory


def available() -> List[str]:
    return sorted(_REGISTRY)


def get(name, **options) -> Estimator:
    """An estimator by registered name (with options), or an estimator object passed through."""
    if not isinstance(name, str):
        if callable(name):
            if options:
                raise ValueError("options were given together with an estimator object; configure "
                                 "the object itself instead")
            return name
        raise TypeError(f"estimator must be a name or a callable estimator, got {type(name).__name__}")
    if name not in _REGISTRY:
        hint = "" if name != "debora-closed-form" else " (it is registered by `import debora`)"
        raise ValueError(f"unknown estimator {name!r}{hint}; available: {', '.join(available())}")
    factory = _REGISTRY[name]
    accepted = getattr(factory, "options", None)
    if isinstance(accepted, tuple) and not any(a.startswith("<") for a in accepted):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"bad options for estimator {name!r}: it does not take {unknown}; it accepts "
                             f"{list(accepted) or 'no options'}" + _why_not(unknown))
    try:
        return factory(**options)
    except TypeError as err:
        raise TypeError(f"bad options for estimator {name!r}: {err}") from None


def _why_not(unknown) -> str:
    if "damping" in unknown:
        return " (damping regularises a Hessian solve; this estimator solves none)"
    return ""


for _cls in (Exact, ConjugateGradient, Neumann, FixedPoint, Unrolled, StochasticNeumann, FirstOrder):
    register(_cls.name, _cls)

__all__ = ["Estimator", "EstimatorInfo", "EstimatorState", "HypergradResult", "register", "available", "get", "draw",
           "is_batch_iterator", "Exact", "ConjugateGradient", "Neumann", "FixedPoint", "Unrolled",
           "StochasticNeumann", "FirstOrder", "ImplicitEstimator"]
