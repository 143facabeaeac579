"""``DeboraConfig``: what to adapt and how (validated when constructed).

Paper symbols: ``init_rank`` = r0 (initial rank of every adapter), ``alpha`` = α (the LoRA scale is
α / r0 and stays fixed when truncation lowers the rank), ``tau`` = τ (rank budget),
``eps`` = ε (the floor of the feasible set S = {s ≥ ε, Σ s ≤ τ + rε}).

``budget="per_layer"``: one floored simplex per layer (a product set); ``"global"``: one simplex over
the concatenation of every layer's s (budget moves between layers). The budget only decides the
initial s (the barycentre of the simplex's vertices) and is read by the trainer to build the
Frank-Wolfe feasible set; the adapters themselves do not enforce it.

``basis``: ``"euclidean"`` (unconstrained bases), ``"oblique"`` (unit-norm columns), ``"stiefel"``
(orthonormal columns; for CP conv adapters the output/input factors A, B are Stiefel and the small
kernel factors C, D, which usually have fewer rows than r, are oblique).
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

BUDGETS = ("global", "per_layer")
BASES = ("euclidean", "oblique", "stiefel")
INIT_BASES = ("random", "principal", "minor")


@dataclass
class DeboraConfig:
    """Configuration of dEBORA adapters.

    Args:
        target_modules: module names to adapt. A list matches a module whose full name equals an
            entry or ends with ``"." + entry`` (e.g. ``["query", "value"]``); a string is a regular
            expression that must match the full module name (``re.fullmatch``), as in PEFT.
        init_rank: r0 ≥ 1, the initial number of rank-one components of every adapter.
        alpha: α; the adapter output is scaled by ``alpha / init_rank``.
        tau: τ > 0, the rank budget of the floored simplex.
        eps: ε > 0, the floor of s.
        budget: ``"global"`` or ``"per_layer"``.
        basis: ``"euclidean"``, ``"oblique"`` or ``"stiefel"``.
        modules_to_save: extra modules trained at the lower level (e.g. ``["classifier"]``), matched
            like list ``target_modules``.
        init_seed: seed of the random bases (``None``: torch's global generator).
        init_s: initial value of every s_i (``None``: the barycentre of the simplex's vertices,
            ε + τ/(n+1), with Euclidean bases; ε + τ/(10(n+1)) with oblique/Stiefel ones). With
            oblique/Stiefel bases the initial update ΔW0 = scaling·U diag(s0) Vᵀ is
            folded into the base weight, so removing a component later re-adds its share of −ΔW0: a
            small ``init_s`` (close to ε) keeps truncation nearly neutral. Must satisfy
            ε ≤ init_s and n·(init_s − ε) ≤ τ (n = components sharing one budget).
        init_bases: directions of the initial oblique/Stiefel bases: ``"random"`` (default),
            ``"principal"`` (each base weight's r leading singular vectors, PiSSA's) or ``"minor"``
            (its r trailing ones, MiLoRA's); the magnitude stays s0 and ΔW0 is folded as usual, so
            the model is unchanged at start. Euclidean bases take ``"random"`` only.
    """

    target_modules: Union[List[str], str] = field(default_factory=list)
    init_rank: int = 8
    alpha: float = 32.0
    tau: float = 16.0
    eps: float = 1e-3
    budget: str = "per_layer"
    basis: str = "euclidean"
    modules_to_save: Optional[List[str]] = None
    init_seed: Optional[int] = None
    init_s: Optional[float] = None
    init_bases: str = "random"

    def __post_init__(self):
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ValueError("target_modules is an empty string; give module names or a regex")
        elif isinstance(tm, (list, tuple, set)):
            tm = list(tm)
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(f"target_modules must be a non-empty list of module names or a regex "
                                 f"string, got {self.target_modules!r}")
            self.target_modules = tm
        else:
            raise TypeError(f"target_modules must be a list of names or a regex string, got "
                            f"{type(tm).__name__}")
        if isinstance(self.init_rank, bool) or not isinstance(self.init_rank, numbers.Integral) \
                or self.init_rank < 1:
            raise ValueError(f"init_rank must be an integer >= 1, got {self.init_rank!r}")
        self.init_rank = int(self.init_rank)
        for name in ("alpha", "tau", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0 \
                    or v == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
            setattr(self, name, float(v))
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.modules_to_save is not None:
            mts = self.modules_to_save
            if isinstance(mts, str):
                mts = [mts]
            if not isinstance(mts, (list, tuple)) or not all(isinstance(t, str) and t for t in mts):
                raise ValueError(f"modules_to_save must be a list of module names, got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = list(mts) or None
        if self.init_s is not None:
            v = self.init_s
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (self.eps <= v < float("inf")):
                raise ValueError(f"init_s must be a finite number >= eps = {self.eps:g}, got {v!r}")
            self.init_s = float(v)
        if self.init_bases not in INIT_BASES:
            raise ValueError(f"init_bases must be one of {INIT_BASES}, got {self.init_bases!r}")
        if self.init_bases != "random" and self.basis == "euclidean":
            raise ValueError(f"init_bases={self.init_bases!r} needs basis='oblique' or 'stiefel' (their "
                             "initial update is folded into the base weight); got basis='euclidean'. "
                             "Use init_bases='random' or change the basis")
        if self.init_seed is not None and not isinstance(self.init_seed, numbers.Integral):
            raise ValueError(f"init_seed must be an int or None, got {self.init_seed!r}")

    @property
    def scaling(self) -> float:
        """α / r0."""
        return self.alpha / self.init_rank

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DeboraConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DeboraConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)
