"""The upper level as a Frank-Wolfe problem: s of every layer <-> one vector, its feasible set, the solver.

* ``global`` budget: one floored simplex ``S = {s ≥ ε, Σ s ≤ τ + Rε}`` over the concatenation of
  every layer's s (R = total number of components; budget moves between layers);
* ``per_layer``: the product of one floored simplex per layer (each with its own τ).

The vector is the concatenation of ``debora.upper_parameters(model)`` in model order; a layer's slice
is ``[offset, offset + rank)``. Truncation removes global coordinates ``offset + i``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from bilevel import frank_wolfe as fw


class SLayout:
    """Names and sizes of the s blocks, in model order, and the original component ids of each."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int]):
        self.names = list(names)
        self.sizes = [int(n) for n in sizes]
        self.ids: Dict[str, List[int]] = {n: list(range(k)) for n, k in zip(self.names, self.sizes)}

    @property
    def offsets(self) -> Dict[str, int]:
        out, o = {}, 0
        for n, k in zip(self.names, self.sizes):
            out[n] = o
            o += k
        return out

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def flatten(self, tree: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tree[n].reshape(-1) for n in self.names])

    def split(self, vec: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, torch.split(vec, self.sizes)))

    def global_indices(self, removed: Dict[str, torch.Tensor]) -> torch.Tensor:
        offs = self.offsets
        parts = [offs[n] + removed[n].to(torch.long).cpu() for n in self.names if n in removed]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def remove(self, removed: Dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            if n in removed and len(removed[n]):
                drop = set(int(j) for j in removed[n])
                self.ids[n] = [c for j, c in enumerate(self.ids[n]) if j not in drop]
                self.sizes[i] = len(self.ids[n])

    def state_dict(self):
        return {"names": self.names, "sizes": self.sizes, "ids": self.ids}

    @classmethod
    def from_state(cls, state) -> "SLayout":
        lay = cls(state["names"], state["sizes"])
        lay.ids = {k: list(v) for k, v in state["ids"].items()}
        return lay


def feasible_set(layout: SLayout, tau: float, eps: float, budget: str):
    if budget == "global":
        return fw.FlooredSimplex(layout.total, tau, eps)
    if budget == "per_layer":
        return fw.ProductSet([fw.FlooredSimplex(k, tau, eps) for k in layout.sizes if k > 0])
    raise ValueError(f"budget={budget!r} is not one of ['global', 'per_layer']")


def step_rule(name: str, lipschitz=10.0, step_size: float = 0.05):
    if name == "short":
        return fw.ShortStep(lipschitz=lipschitz)
    if name == "armijo":
        return fw.Armijo()
    if name == "open-loop":
        return fw.OpenLoop()
    if name == "constant":
        return fw.Constant(step_size)
    raise ValueError(f"fw_step={name!r} is not one of ['short', 'armijo', 'open-loop', 'constant']")


SOLVERS = {"away": "AwayStepFW", "vanilla": "VanillaFW", "pairwise": "PairwiseFW"}


def solver(method: str, feasible, step, gap_tol: float = 0.0):
    if method not in SOLVERS:
        raise ValueError(f"fw={method!r} is not one of {sorted(SOLVERS)}")
    return getattr(fw, SOLVERS[method])(feasible, step=step, gap_tol=gap_tol)
