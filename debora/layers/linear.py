"""Matrix adapter for ``nn.Linear`` and GPT-2 style ``Conv1D`` (weight stored transposed).

    y = base(x) + scaling · ((x V) ⊙ s) Uᵀ          ΔW = scaling · U diag(s) Vᵀ   (out × in)

``U`` is ``[out, r]``, ``V`` is ``[in, r]``, ``s`` is ``[r]``; ΔW is never formed in the forward pass
(cost O(N r (in + out)) on N tokens). For ``Conv1D`` (``y = x W + b`` with ``W`` of shape
``[in, out]``) the merged update is ``ΔWᵀ``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer, singular_directions

try:  # transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


class MatrixAdapter(AdapterLayer):
    """dEBORA adapter around an ``nn.Linear`` or ``Conv1D``."""

    basis_names = ("U", "V")
    colmajor_names = ("V",)

    def __init__(self, base: nn.Module, basis: str, scaling: float):
        super().__init__(base, basis, scaling)
        if isinstance(base, nn.Linear):
            self.transposed = False
            self.out_features, self.in_features = base.weight.shape
        elif Conv1D and isinstance(base, Conv1D):
            self.transposed = True
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"MatrixAdapter wraps nn.Linear or transformers Conv1D, got "
                            f"{type(base).__name__}")

    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def basis_shapes(self, r: int):
        return {"U": (self.out_features, r), "V": (self.in_features, r)}

    def _euclidean_init(self, bases, generator):
        bound = 1.0 / math.sqrt(self.in_features)   # LoRA's kaiming_uniform(a=√5) bound for A
        r = bases["V"].shape[1]
        bases["V"] = (torch.rand(self.in_features, r, generator=generator, dtype=torch.float64)
                      * 2 - 1) * bound
        bases["U"] = torch.zeros(self.out_features, r, dtype=torch.float64)
        return bases

    def singular_rank_bound(self) -> int:
        return min(self.in_features, self.out_features)

    def _singular_bases(self, r, which):
        W = self.weight_ref.transpose(0, 1) if self.transposed else self.weight_ref   # [out, in]
        U, V = singular_directions(W, r, which, self.describe())
        return {"U": U, "V": V}

    def _delta_from(self, s, bases, scaling):
        d = (bases["U"] * (s * scaling)) @ bases["V"].transpose(0, 1)   # [out, in]
        return d.transpose(0, 1) if self.transposed else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.s.shape[0] == 0:
            return out
        h = (x @ self.V) * (self.s * self.scaling)
        return out + h @ self.U.transpose(0, 1)

    def describe(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return f"{kind}(in={self.in_features}, out={self.out_features})"
