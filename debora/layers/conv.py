"""CP (CANDECOMP/PARAFAC) adapter for ``nn.Conv2d``.

    ΔK = scaling · Σ_i s_i a_i ⊗ b_i ⊗ c_i ⊗ d_i          (out × in × kh × kw)

with ``A`` ``[out, r]``, ``B`` ``[in, r]``, ``C`` ``[kh, r]``, ``D`` ``[kw, r]``. Applied without forming
ΔK, as four cheap convolutions on r channels::

    1×1 conv (in → r, weight Bᵀ)
    depthwise kh×1 conv (weight C, base stride/padding/dilation along H)
    depthwise 1×kw conv (weight D, base stride/padding/dilation along W)
    multiply channel i by scaling·s_i
    1×1 conv (r → out, weight A)

This equals the dense convolution with kernel ΔK (zero padding, strides and dilations factor over the
two spatial axes; ``padding="same"`` too, since PyTorch pads each axis independently).
Parameters ``r(out + in + kh + kw)`` instead of LoRA's ``r(out + in·kh·kw)``.

Pointwise layers (1×1 kernel, no padding: the adapted convolutions of EfficientNet/MobileNet blocks)
take a shorter path with the same value: C and D are 1×r, so the two depthwise convolutions only
scale channel i by c_i·d_i, and the branch is two 1×1 convolutions as in LoRA,
``conv1x1(x, (B diag(scaling·s∘c∘d))ᵀ, stride)`` then ``conv1x1(·, A)``.

``nn.Conv2d`` subclasses with their own ``forward`` (TF-style "same" padding, e.g. EfficientNet's
``Conv2dStaticSamePadding`` / ``Conv2dDynamicSamePadding``): when the layer has a ``static_padding``
module, the factorised branch runs on ``static_padding(x)``; any other subclass falls back to one
convolution through the subclass's own forward with the merged kernel ``W + ΔK`` (exact, and as
cheap in the forward pass as the base conv, but the backward computes a dense kernel gradient).

Refused (``ValueError``): grouped / depthwise convolutions (``groups > 1``: a CP factor over the
grouped kernel would need one r-channel bottleneck per group) and ``padding_mode`` other than
``"zeros"``. Exclude such layers with a ``target_modules`` regex.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import AdapterLayer, singular_directions


class CPConv2dAdapter(AdapterLayer):
    """dEBORA CP adapter around an ``nn.Conv2d`` (``groups == 1``, zero padding)."""

    basis_names = ("A", "B", "C", "D")
    colmajor_names = ("B", "C", "D")

    def __init__(self, base: nn.Conv2d, basis: str, scaling: float, name: str = "conv"):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"CPConv2dAdapter wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"{name!r} is a grouped convolution (groups={base.groups}); CP adapters "
                             "support groups=1 only. Leave depthwise/grouped convs out of "
                             "target_modules (e.g. with a regex)")
        if base.padding_mode != "zeros":
            raise ValueError(f"{name!r} uses padding_mode={base.padding_mode!r}; CP adapters support "
                             "'zeros' only. Leave it out of target_modules")
        super().__init__(base, basis, scaling)
        self.out_channels, self.in_channels, self.kh, self.kw = base.weight.shape
        sh, sw = base.stride
        dh, dw = base.dilation
        if isinstance(base.padding, str):
            ph = pw = base.padding
        else:
            ph, pw = (base.padding[0], 0), (0, base.padding[1])
        self._h = dict(stride=(sh, 1), padding=ph, dilation=(dh, 1))
        self._w = dict(stride=(1, sw), padding=pw, dilation=(1, dw))
        self.mode = "factorised"
        pad = base.padding
        self.pointwise = (self.kh, self.kw) == (1, 1) and (isinstance(pad, str) or tuple(pad) == (0, 0))
        if type(base).forward is not nn.Conv2d.forward:
            pad = getattr(base, "static_padding", None)
            self.mode = "static_padding" if isinstance(pad, nn.Module) else "merged_kernel"

    @property
    def basis_kinds(self):
        small = "oblique" if self.basis == "stiefel" else self.basis
        return {"A": self.basis, "B": self.basis, "C": small, "D": small}

    def max_rank(self) -> int:
        dims = sorted((self.out_channels, self.in_channels, self.kh, self.kw))
        bound = dims[0] * dims[1] * dims[2]          # generic CP-rank bound: product of the rest
        if self.basis == "stiefel":
            bound = min(bound, self.out_channels, self.in_channels)
        return bound

    def basis_shapes(self, r: int):
        return {"A": (self.out_channels, r), "B": (self.in_channels, r), "C": (self.kh, r),
                "D": (self.kw, r)}

    def _euclidean_init(self, bases, generator):
        r = bases["A"].shape[1]
        bound = 1.0 / math.sqrt(self.in_channels)
        bases["B"] = (torch.rand(self.in_channels, r, generator=generator, dtype=torch.float64)
                      * 2 - 1) * bound
        bases["A"] = torch.zeros(self.out_channels, r, dtype=torch.float64)
        for n in ("C", "D"):
            X = bases[n]
            bases[n] = X / X.norm(dim=0, keepdim=True).clamp_min(1e-12)
        return bases

    def singular_rank_bound(self) -> int:
        k = self.kh * self.kw
        return min(self.out_channels, self.in_channels * k, self.in_channels, self.out_channels * k)

    def _singular_bases(self, r, which):
        W = self.weight_ref.detach()                                  # [out, in, kh, kw]
        what = self.describe()
        if (self.kh, self.kw) == (1, 1):     # the [out, in] matrix's SVD, paired vectors; C = D = 1
            A, B = singular_directions(W[:, :, 0, 0], r, which, what)
            one = torch.ones(1, r, dtype=torch.float64)
            return {"A": A, "B": B, "C": one, "D": one.clone()}
        A, _ = singular_directions(W.reshape(self.out_channels, -1), r, which, what + " (mode-0 unfolding)")
        B, _ = singular_directions(W.transpose(0, 1).reshape(self.in_channels, -1), r, which,
                                   what + " (mode-1 unfolding)")
        return {"A": A, "B": B}

    def _delta_from(self, s, f, scaling):
        return torch.einsum("i,oi,ci,pi,qi->ocpq", s * scaling, f["A"], f["B"], f["C"], f["D"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.s.shape[0]
        if r > 0 and self.mode == "merged_kernel":
            return functional_call(self.base, {"weight": self.base.weight + self.delta_weight()}, (x,))
        out = self.base(x)
        if r == 0:
            return out
        if self.mode == "static_padding":
            x = self.base.static_padding(x)
        if self.pointwise:   # 1×1, unpadded ("same"/"valid" pad nothing for 1×1): two 1×1 convs
            w = self.B * (self.s * self.scaling * self.C[0] * self.D[0])
            h = F.conv2d(x, w.transpose(0, 1).contiguous()[:, :, None, None], stride=self.base.stride)
            return out + F.conv2d(h, self.A[:, :, None, None])
        # B, C, D are stored column-major, so these transposes are free (no copy)
        h = F.conv2d(x, self.B.transpose(0, 1).contiguous()[:, :, None, None])
        h = F.conv2d(h, self.C.transpose(0, 1).contiguous()[:, None, :, None], groups=r, **self._h)
        h = F.conv2d(h, self.D.transpose(0, 1).contiguous()[:, None, None, :], groups=r, **self._w)
        h = h * (self.s * self.scaling)[:, None, None]
        return out + F.conv2d(h, self.A[:, :, None, None])

    def describe(self) -> str:
        return (f"Conv2d(in={self.in_channels}, out={self.out_channels}, "
                f"kernel={self.kh}x{self.kw})")
