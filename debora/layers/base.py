"""``AdapterLayer``: what every dEBORA adapter shares (a frozen base layer + rank weights ``s``).

Parameters of an adapter layer (names are part of the public contract):

* ``s``      — rank weights, shape ``[r]`` (paper: s). An ``nn.Parameter`` with
  ``requires_grad=False``: s is the upper-level variable, moved by Frank-Wolfe, never by a gradient
  optimizer; a plain ``torch.optim`` over ``requires_grad`` parameters therefore trains exactly the
  lower level (bases + modules_to_save).
* bases      — ``U`` ``[out, r]`` and ``V`` ``[in, r]`` for matrix layers; ``A`` ``[out, r]``,
  ``B`` ``[in, r]``, ``C`` ``[kh, r]``, ``D`` ``[kw, r]`` for CP conv layers (``requires_grad=True``).
  Input-side bases (``V``, ``B``, ``C``, ``D``) are stored column-major (strides ``(1, n)``) for
  faster BLAS calls; truncation and loading keep that layout. Call ``.contiguous()`` if you need
  row-major storage.
* ``base``   — the wrapped layer, frozen.

``scaling = alpha / r0`` is fixed at injection: truncation lowers r without rescaling.

Initialisation (ΔW = 0 at start, s feasible):
  * Euclidean bases: the output factor (``U`` / ``A``) is zero, as in LoRA.
  * Oblique / Stiefel bases cannot be zero, so the initial update ΔW0 is *folded* into the base
    weight (``W0 ← W0 − ΔW0``, like PEFT's PiSSA/OLoRA): the model output is unchanged at start.
    The initial factors are kept as buffers (``U0`` = scaling·U·diag(s0), ``V0``; ``A0`` … ``D0`` for
    CP) so that saving, loading onto an untouched base model, and PEFT export stay exact.

Directions of the initial bases (``DeboraConfig.init_bases``, oblique / Stiefel only):
  * ``"random"``: Gaussian columns retracted onto the manifold (the default).
  * ``"principal"``: the base weight's r leading singular vectors, W = Σ_j σ_j l_j r_jᵀ →
    U = [l_1 … l_r], V = [r_1 … r_r] (PiSSA's directions, Meng et al. 2024), at the magnitude s0:
    the first steps move W along its principal subspace (ΔU V0ᵀ + U0 ΔVᵀ) instead of random ones.
  * ``"minor"``: the r trailing singular vectors (MiLoRA's directions, Wang et al. 2024).
  For CP adapters A and B come from the kernel's mode-0 / mode-1 unfoldings (HOSVD's factors; for
  1×1 kernels this is the SVD of the [out, in] matrix, and C = D = 1); C and D of larger kernels
  stay random.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .. import manifolds
from ..config import INIT_BASES as INIT_DIRECTIONS


def singular_directions(W: torch.Tensor, r: int, which: str, what: str):
    """``(L, R)``: r left / right singular vectors of the matrix W (float64), the leading ones for
    ``which="principal"``, the trailing ones for ``"minor"``, columns in singular-value order.
    ``what`` names W in the error raised when W has fewer than r singular vectors."""
    k = min(W.shape)
    if r > k:
        raise ValueError(f"init_bases={which!r} needs init_rank <= {k} for {what} (it has {k} singular "
                         f"vectors), got init_rank={r}; lower init_rank or use init_bases='random'")
    L, _, Rh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    idx = slice(0, r) if which == "principal" else slice(k - r, k)
    return L[:, idx], Rh[idx].transpose(0, 1)


class AdapterLayer(nn.Module):
    """Base class: ``base`` layer + ``s`` + bases; subclasses define the bases and the forward."""

    basis_names: Sequence[str] = ()
    colmajor_names: Sequence[str] = ()

    def __init__(self, base: nn.Module, basis: str, scaling: float):
        super().__init__()
        self.base = base
        self.basis = basis
        self.scaling = float(scaling)
        self.folded = False
        self.refolded = False      # the folded ΔW0 is not the injection's (refactor.refold_magnitudes_)

    # -- shape information ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def basis_kinds(self) -> Dict[str, str]:
        return {n: self.basis for n in self.basis_names}

    def max_rank(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def basis_shapes(self, r: int) -> Dict[str, tuple]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight_ref(self) -> torch.Tensor:
        return self.base.weight

    # -- construction -----------------------------------------------------------------------------
    def _layout(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Bases that multiply the *input* (``V``; ``B``, ``C``, ``D``) are stored column-major
        (shape ``[n, r]``, strides ``(1, n)``, i.e. the storage of an ``[r, n]`` matrix, like LoRA's
        ``lora_A``). The BLAS calls of the forward and backward then hit the fast layouts (measured
        ~1.3-1.6x faster on CPU for the first projection); shapes and values are unaffected."""
        if name in self.colmajor_names:
            return t.transpose(0, 1).contiguous().transpose(0, 1)
        return t.contiguous()

    def _set_params(self, s: torch.Tensor, bases: Dict[str, torch.Tensor]) -> None:
        """Install (new) Parameter objects for s and the bases."""
        w = self.weight_ref
        self.s = nn.Parameter(s.to(device=w.device, dtype=w.dtype).contiguous(), requires_grad=False)
        for n in self.basis_names:
            t = self._layout(n, bases[n].to(device=w.device, dtype=w.dtype))
            setattr(self, n, nn.Parameter(t, requires_grad=True))

    def empty_(self, r: int) -> None:
        """Zero-filled adapter of rank r (used when loading saved weights)."""
        w = self.weight_ref
        z = {n: torch.zeros(shape, dtype=w.dtype) for n, shape in self.basis_shapes(r).items()}
        self._set_params(torch.zeros(r, dtype=w.dtype), z)

    def init_(self, r: int, s0: float, generator: Optional[torch.Generator] = None,
              directions: str = "random") -> None:
        """Bases of rank r (ΔW = 0, see module doc) and ``s = s0·1``; ``directions``: ``"random"``,
        or the base weight's ``"principal"`` / ``"minor"`` singular vectors (oblique/Stiefel only)."""
        if not 1 <= r <= self.max_rank():
            raise ValueError(f"init_rank={r} is not allowed for this {self.describe()}: it must be "
                             f"between 1 and {self.max_rank()}; lower init_rank or leave this layer out "
                             f"of target_modules")
        if directions not in INIT_DIRECTIONS:
            raise ValueError(f"directions must be one of {INIT_DIRECTIONS}, got {directions!r}")
        if directions != "random" and self.basis == "euclidean":
            raise ValueError(f"init_bases={directions!r} needs oblique or stiefel bases (their ΔW0 is "
                             "folded into the base weight); with basis='euclidean' use init_bases='random'")
        bases = {}
        for n, shape in self.basis_shapes(r).items():
            kind = self.basis_kinds[n]
            bases[n] = manifolds.random_point(kind, shape[0], r, generator, torch.float64)
        if directions != "random":
            bases.update(self._singular_bases(r, directions))
        if self.basis == "euclidean":
            bases = self._euclidean_init(bases, generator)
        self._set_params(torch.full((r,), float(s0), dtype=torch.float64), bases)
        if self.basis != "euclidean":
            self.fold_init_()

    def _euclidean_init(self, bases, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def singular_rank_bound(self) -> int:  # pragma: no cover - abstract
        """The largest r for which ``init_(directions="principal" / "minor")`` has r singular vectors."""
        raise NotImplementedError

    def _singular_bases(self, r: int, which: str) -> Dict[str, torch.Tensor]:  # pragma: no cover
        """The bases that ``init_(directions=which)`` takes from the base weight's SVD."""
        raise NotImplementedError

    # -- the update -------------------------------------------------------------------------------
    def init_factors(self) -> Dict[str, torch.Tensor]:
        """The folded initial factors (empty for Euclidean bases)."""
        return {n: getattr(self, n + "0") for n in self.basis_names if hasattr(self, n + "0")}

    def _delta_from(self, s: torch.Tensor, bases: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def fold_init_(self, factors: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """``W0 ← W0 − ΔW0`` and remember ΔW0's factors as buffers (see module doc)."""
        if factors is None:
            first = self.basis_names[0]
            factors = {n: getattr(self, n).detach().clone() for n in self.basis_names}
            factors[first] = factors[first] * (self.s.detach() * self.scaling)
        for n, t in factors.items():
            self.register_buffer(n + "0", t.to(self.weight_ref).contiguous())
        # computed from the stored (contiguous) buffers, exactly as after loading: bit-exact round trip
        self.weight_ref.sub_(self.unfold_delta())
        self.folded = True

    @torch.no_grad()
    def refold_(self, factors: Dict[str, torch.Tensor], weight: Optional[torch.Tensor] = None) -> None:
        """Replace the folded ΔW0 by the one of ``factors`` (``{"U": U0, "V": V0}`` / ``A``..``D``, as
        returned by :meth:`init_factors`). Use it when restoring a checkpoint of an oblique/Stiefel
        model into a freshly injected one whose random ΔW0 differs (``W ← W + ΔW0_old − ΔW0_new``);
        ``weight``: the saved base weight, copied as it is (bit-exact, where the arithmetic above
        rounds differently from the run that folded several times)."""
        if weight is not None:
            self.weight_ref.copy_(weight)
            for n, t in factors.items():
                self.register_buffer(n + "0", t.to(self.weight_ref).contiguous())
            self.folded = True
            return
        if self.folded:
            self.weight_ref.add_(self.unfold_delta())
        self.fold_init_(factors)

    @torch.no_grad()
    def unfold_(self) -> None:
        """Undo the fold: ``W0 ← W0 + ΔW0``, the buffers ``<b>0`` are dropped and the layer behaves
        like a Euclidean one (its update is ΔW alone). The model's output changes by ΔW0 unless the
        bases were rewritten first to carry ΔW − ΔW0 (``debora.svd_refactor(..., unfold=True)``)."""
        if not self.folded:
            return
        self.weight_ref.add_(self.unfold_delta())
        for n in self.basis_names:
            self._buffers.pop(n + "0", None)
        self.folded = self.refolded = False

    @torch.no_grad()
    def unfold_delta(self) -> torch.Tensor:
        """ΔW0 that was folded into the base weight (zeros if none)."""
        f = self.init_factors()
        if not f:
            return torch.zeros_like(self.weight_ref)
        one = torch.ones(f[self.basis_names[0]].shape[1], dtype=self.weight_ref.dtype,
                         device=self.weight_ref.device)
        return self._delta_from(one, f, 1.0)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ΔW in the layout of ``base.weight`` (includes ``scaling``)."""
        return self._delta_from(self.s, {n: getattr(self, n) for n in self.basis_names}, self.scaling)

    # -- truncation and merging -------------------------------------------------------------------
    @torch.no_grad()
    def keep_(self, idx: torch.Tensor) -> None:
        """Keep only components ``idx`` (new Parameter objects, same requires_grad)."""
        idx = idx.to(self.s.device)
        self.s = nn.Parameter(self.s.index_select(0, idx).clone(), requires_grad=self.s.requires_grad)
        for n in self.basis_names:
            p = getattr(self, n)
            setattr(self, n, nn.Parameter(self._layout(n, p.index_select(1, idx)).clone(),
                                          requires_grad=p.requires_grad))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with ΔW added to its weight (in place), to replace this adapter."""
        if self.rank > 0:
            self.weight_ref.add_(self.delta_weight())
        return self.base

    def adapter_numel(self) -> int:
        return self.s.numel() + sum(getattr(self, n).numel() for n in self.basis_names)

    def component_numel(self) -> int:
        """Parameters one component costs: its s_i and one column of every basis (defined at rank 0)."""
        return 1 + sum(math.prod(shape) for shape in self.basis_shapes(1).values())

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rank={self.rank}, basis={self.basis!r}, scaling={self.scaling:g}"
