"""A bilevel rank-selection problem built on debora's own adapters (one source of truth).

Each problem is a small float64 ``nn.Module`` whose adapted layers are wrapped by ``debora.inject``
(:class:`debora.MatrixAdapter` for ``nn.Linear``, :class:`debora.CPConv2dAdapter` for ``nn.Conv2d``).
The losses run the adapted model through ``debora.bilevel_problem``, so every forward pass, every
``ΔW`` and every estimator evaluated here is the library's code. For adapted layer ℓ (frozen
``W0_ℓ``):

    Ψ_ℓ(B_ℓ, s_ℓ) = scaling · Σ_i s_i u_i^{(1)} ⊗ … ⊗ u_i^{(d)}   (d = 2: U diag(s) Vᵀ; d = 4: CP)

and the task loss sees ``W0_ℓ + Ψ_ℓ``. ``debora.inject`` folds the initial update of oblique/Stiefel
bases into the base weight; the checks undo that fold (the base weight is W0 exactly, no folded
buffers), so that ΔW = Ψ(B, s) for every basis and ``merge_and_unload`` gives W0 + Ψ.

Variables: x = {"s": every layer's s concatenated} (one vector, so that one floored simplex or a
product of them can be put on it), y = debora's lower parameters (``"<layer>.U"``, ``"<layer>.V"``;
``"<layer>.A"`` … ``"<layer>.D"``; head parameters), holding *ambient* bases Ũ. Bases on a manifold
are reached through debora's retraction inside the losses, ``U = debora.manifolds.retraction(Ũ)``
(oblique: column normalisation; Stiefel: QR with diag(R) ≥ 0), plus a gauge penalty
``μ/4 ‖c(Ũ)‖²`` on the constraint residual. The minimiser of g lies on the manifold at the Riemannian
minimiser (the penalty vanishes there and f∘R cannot be lowered off it), and any retraction's
differential is the identity on the tangent space, so the implicit-function hypergradient in Ũ is
the Riemannian one.

Lower loss (paper f2, on D2) with the damping we report:

    g(s, y) = L(W0 + Ψ(R(Ũ), s); D2) + λ/2 ‖y_eucl‖² + μ/4 Σ ‖c(Ũ)‖²

``λ`` (``weight_decay``) acts on Euclidean bases and the head (it makes ∂²_yy g non-singular along the
scaling symmetry U diag(s) Vᵀ = (U D) diag(s) (V D⁻¹)); its value is part of every report. Upper
loss: f1 = L(…; D1) (``upper_damped=True``: f1 = g on D1, the "upper = lower" variant).
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import grad

import bilevel
import debora
from bilevel import pytree as pt
from debora import manifolds

BASES = ("euclidean", "oblique", "stiefel")


@dataclass
class LayerSpec:
    name: str
    shape: tuple             # (out, in) for d = 2; (out, in, kh, kw) for CP d = 4
    rank: int
    scale: float = 1.0       # debora's scaling = alpha / r0

    @property
    def order(self) -> int:
        return len(self.shape)


def split_halves(data: Dict[str, torch.Tensor], perm: torch.Tensor):
    """``(D1, D2)``: the first and second half of ``perm`` applied to every tensor of ``data``."""
    half = perm.numel() // 2
    return ({k: v[perm[:half]] for k, v in data.items()},
            {k: v[perm[half:]] for k, v in data.items()})


def split_data(data: Dict[str, torch.Tensor], perm: torch.Tensor, split: str = "halves"):
    """``(D1, D2)``: random equal halves (``"halves"``) or ``D1 = D2`` = all of ``data``
    (``"same"``: the upper and lower losses are the same training loss)."""
    if split == "halves":
        return split_halves(data, perm)
    if split == "same":
        D = {k: v[perm] for k, v in data.items()}
        return D, D
    raise ValueError(f"split={split!r} is not one of 'halves', 'same'")


def distinct_s0(n: int, tau: float, eps: float) -> torch.Tensor:
    """A feasible start with distinct weights ``ε + 0.8 τ w/Σw``, w = (n, …, 1): equal s_i would add a
    rotation symmetry among components (a singular ∂²_BB g)."""
    w = torch.arange(n, 0, -1, dtype=torch.float64)
    return eps + 0.8 * tau * w / w.sum()


def gauge_residual(U: torch.Tensor, kind: str) -> torch.Tensor:
    """Constraint residual of a basis: ``diag(UᵀU) − 1`` (oblique), ``UᵀU − I`` (Stiefel)."""
    if kind == "oblique":
        return (U * U).sum(0) - 1.0
    if kind == "stiefel":
        return U.T @ U - torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return U.new_zeros(())


Batch = Dict[str, torch.Tensor]


class AdapterProblem:
    """Bilevel problem ``min_s f1(B*(s), s)`` with ``B*(s) = argmin_B g(s, B)`` (see module doc).

    Args:
        model: a float64 module (not yet injected); ``targets`` name its adapted layers.
        targets: ``{layer name: rank}``, layers ``nn.Linear`` or ``nn.Conv2d``.
        inputs: ``inputs(batch) -> (args, kwargs)`` for the model.
        loss: ``loss(output, batch) -> scalar``.
        D1, D2: dicts of tensors with a common first dimension (the examples).
        head: ``modules_to_save`` (trained at the lower level), may be empty.
        scaling: debora's ``alpha / r0`` (1 for the original checks).
        s0: initial s (flat); bases: random unit columns (``init_scale``), retracted by debora.
    """

    def __init__(self, name: str, model: nn.Module, targets: Dict[str, int], inputs: Callable,
                 loss: Callable, D1: Batch, D2: Batch, basis: str = "euclidean", tau: float = 1.0,
                 eps: float = 1e-3, weight_decay: float = 1e-2, gauge: float = 1.0,
                 s0: Optional[torch.Tensor] = None, init_scale: float = 1.0, seed: int = 0,
                 head: Sequence[str] = (), scaling: float = 1.0, description: str = "",
                 restricted: str = "", upper_damped: bool = False, split: str = "halves"):
        if basis not in BASES:
            raise ValueError(f"basis={basis!r} is not one of {BASES}")
        ranks = set(targets.values())
        if len(ranks) != 1:
            raise ValueError(f"debora.inject uses one init_rank for every layer, got ranks {targets}")
        rank = ranks.pop()
        self.name, self.basis, self.model = name, basis, model
        self.loss_fn, self.inputs = loss, inputs
        self.D1, self.D2, self.split = D1, D2, split
        self.tau, self.eps, self.weight_decay, self.gauge = tau, eps, weight_decay, gauge
        self.upper_damped = upper_damped
        self.description, self.restricted = description, restricted
        W0 = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
        cfg = debora.DeboraConfig(target_modules=list(targets), init_rank=rank, alpha=scaling * rank,
                                  tau=tau, eps=eps, budget="global", basis=basis,
                                  modules_to_save=list(head) or None, init_seed=seed)
        debora.inject(model, cfg)
        self.adapters = debora.adapter_layers(model)
        self.layers = [LayerSpec(n, tuple(W0[n].shape), rank, ad.scaling) for n, ad in self.adapters.items()]
        self.frozen = W0
        self.dtype, self.device = W0[self.layers[0].name].dtype, W0[self.layers[0].name].device
        self.r_total = sum(l.rank for l in self.layers)
        self.blocks = [l.rank for l in self.layers]
        # the problem's own start: base weight W0 (fold undone), random unit-column bases, s0
        gen = torch.Generator().manual_seed(seed)
        if s0 is None:
            s0 = torch.full((self.r_total,), eps + 0.8 * tau / self.r_total, dtype=torch.float64)
        with torch.no_grad():
            for l, (n, ad) in zip(self.layers, self.adapters.items()):
                ad.weight_ref.copy_(W0[n])
                for b in ad.basis_names:
                    if hasattr(ad, b + "0"):
                        delattr(ad, b + "0")
                ad.folded = False
                for b in ad.basis_names:
                    p = getattr(ad, b)
                    U = torch.randn(p.shape[0], l.rank, generator=gen, dtype=torch.float64)
                    U = U / U.norm(dim=0, keepdim=True) * init_scale       # columns of norm init_scale
                    U = manifolds.retraction(ad.basis_kinds[b], U)
                    p.copy_(U.to(p))
        self.dproblem, _, y = debora.bilevel_problem(model, loss, inputs_fn=inputs)
        self.kinds: Dict[str, str] = dict(self.dproblem.basis_kinds)
        self.s_keys = [f"{n}.s" for n in self.adapters]
        self.y_init = {k: v.detach().clone() for k, v in y.items()}
        self.x0 = {"s": s0.to(self.dtype).to(self.device)}
        self.write(self.x0, self.y_init)
        self.problem = bilevel.BilevelProblem(self.upper_loss, self.lower_loss)

    # -- structure ---------------------------------------------------------------------------------
    def _key(self, layer: LayerSpec, k: int) -> str:
        return f"{layer.name}.{self.adapters[layer.name].basis_names[k]}"

    def basis_keys(self) -> List[str]:
        return [self._key(l, k) for l in self.layers for k in range(l.order)]

    def is_basis(self, key: str) -> bool:
        return key in self.kinds

    def head_of(self, y) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in y.items() if k not in self.kinds}

    def split_s(self, s: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, i = {}, 0
        for l in self.layers:
            out[l.name] = s[i:i + l.rank]
            i += l.rank
        return out

    def x_debora(self, x) -> Dict[str, torch.Tensor]:
        """``{"<layer>.s": …}`` (debora's upper variable) from the flat ``x["s"]``."""
        return {f"{n}.s": v for n, v in self.split_s(x["s"]).items()}

    def retracted(self, y) -> Dict[str, torch.Tensor]:
        """y with every basis put on its manifold by ``debora.manifolds.retraction``."""
        return {k: (manifolds.retraction(self.kinds[k], v) if k in self.kinds else v) for k, v in y.items()}

    def factors(self, y) -> Dict[str, List[torch.Tensor]]:
        """Retracted bases per layer (the U^{(k)} the adapter actually uses)."""
        yr = self.retracted({k: y[k] for k in self.basis_keys()})
        return {l.name: [yr[self._key(l, k)] for k in range(l.order)] for l in self.layers}

    def deltas_from(self, s: torch.Tensor, factors) -> Dict[str, torch.Tensor]:
        """ΔW of every layer by the adapter's own formula (``AdapterLayer._delta_from``, the code behind
        ``delta_weight`` and ``merge_and_unload``)."""
        ss = self.split_s(s)
        out = {}
        for l in self.layers:
            ad = self.adapters[l.name]
            out[l.name] = ad._delta_from(ss[l.name], dict(zip(ad.basis_names, factors[l.name])), ad.scaling)
        return out

    @torch.no_grad()
    def write(self, x, y) -> None:
        """Write (s, retracted bases, head) into the live model's parameters."""
        params = dict(self.model.named_parameters())
        for k, v in {**self.x_debora(pt.detach(x)), **self.retracted(pt.detach(y))}.items():
            params[k].copy_(v)

    # -- losses ------------------------------------------------------------------------------------
    def loss_of_deltas(self, deltas, head, batch) -> torch.Tensor:
        """Task loss L as a function of Ψ (the ΔW of every adapted layer) and the head: the adapted
        model with base weights W0 + Ψ and s = 0 (debora's forward; the adapter branch is zero)."""
        params = {}
        for l in self.layers:
            params[f"{l.name}.base.weight"] = self.frozen[l.name] + deltas[l.name]
            params[f"{l.name}.s"] = torch.zeros(l.rank, dtype=self.dtype, device=self.device)
        params.update(head)
        args, kwargs = self.inputs(batch)
        out = torch.func.functional_call(self.model, params, args, kwargs, strict=False)
        return self.loss_fn(out, batch)

    def task_loss(self, x, y, batch) -> torch.Tensor:
        return self.dproblem.f(self.x_debora(x), self.retracted(y), batch)

    def upper_loss(self, x, y, batch):
        if self.upper_damped:
            return self.lower_loss(x, y, batch)
        return self.task_loss(x, y, batch)

    def regulariser(self, y) -> torch.Tensor:
        # weight decay on Euclidean bases and the head; manifold bases have a fixed norm, so they
        # get only the gauge penalty (its minimum is on the manifold, where g's minimiser then lies)
        reg = 0.0
        for k, v in y.items():
            kind = self.kinds.get(k, "euclidean")
            if kind == "euclidean":
                reg = reg + 0.5 * self.weight_decay * (v * v).sum()
            else:
                c = gauge_residual(v, kind)
                reg = reg + 0.25 * self.gauge * (c * c).sum()
        return reg

    def lower_loss(self, x, y, batch):
        return self.task_loss(x, y, batch) + self.regulariser(y)

    def retract_y(self, y):
        """Put the ambient bases back on the manifold (after an optimiser step)."""
        return self.retracted(y)

    def riemannian_lower_grad(self, x, y, batch=None) -> Dict[str, torch.Tensor]:
        """``∂_y g`` with every basis block replaced by its tangent projection
        ``debora.manifolds.project`` at the retracted basis (the stationarity of B on the manifold)."""
        batch = self.D2 if batch is None else batch
        yr = self.retracted(pt.detach(y))
        gy = grad(self.lower_loss, argnums=1)(pt.detach(x), yr, batch)
        return {k: (manifolds.project(self.kinds[k], yr[k], v) if k in self.kinds else v) for k, v in gy.items()}

    # -- batches -----------------------------------------------------------------------------------
    @staticmethod
    def n_examples(D: Batch) -> int:
        return next(iter(D.values())).shape[0]

    @staticmethod
    def subset(D: Batch, idx: torch.Tensor) -> Batch:
        return {k: v[idx] for k, v in D.items()}

    def minibatches(self, D: Batch, size: int, count: int, seed: int) -> List[Batch]:
        n = self.n_examples(D)
        g = torch.Generator().manual_seed(seed)
        size = min(size, n)
        return [self.subset(D, torch.randperm(n, generator=g)[:size].to(self.device)) for _ in range(count)]

    def stream(self, D: Batch, size: int, seed: int):
        n = self.n_examples(D)
        g = torch.Generator().manual_seed(seed)
        size = min(size, n)
        while True:
            perm = torch.randperm(n, generator=g).to(self.device)
            for i in range(0, n - size + 1, size):
                yield self.subset(D, perm[i:i + size])

    # -- the closed form of Theorem 4.1 (the library's estimator) ----------------------------------
    def closed_form(self, x, y, batch, riemannian: bool = False) -> Dict[str, torch.Tensor]:
        """``G(s) = ∂_s f1 − diag(Σ_k U^{(k)ᵀ} ∂_{U^{(k)}} f1) ⊙ s⁻¹`` per layer: debora's
        ``debora-closed-form`` estimator on the adapted model at (s, retracted bases), with Euclidean
        basis gradients or their tangent projections (``riemannian=True``)."""
        est = bilevel.estimators.get("debora-closed-form",
                                     basis_grad="riemannian" if riemannian else "euclidean")
        xd = self.x_debora(pt.detach(x))
        res = est(self.dproblem, xd, self.retracted(pt.detach(y)), batch, batch)
        return {"s": torch.cat([res.grad[k].reshape(-1) for k in self.s_keys]).detach()}

    # -- the operators of Theorem 4.1 --------------------------------------------------------------
    def psi_point(self, x, y):
        facs = self.factors(pt.detach(y))
        return {k: v.detach() for k, v in self.deltas_from(x["s"].detach(), facs).items()}

    def psi_hvp(self, x, y, batch):
        """``v ↦ ∇²_Ψ L(Ψ*) v`` on the flattened Ψ of all adapted layers; returns (matvec, n)."""
        psi0 = self.psi_point(x, y)
        head = self.head_of(pt.detach(y))
        f = lambda d: self.loss_of_deltas(d, head, batch)  # noqa: E731
        gfun = grad(f)

        def mv(v):
            tangent = pt.unflatten(v.to(self.dtype), psi0)
            return pt.flatten(torch.func.jvp(gfun, (psi0,), (tangent,))[1]).to(v.dtype)

        return mv, pt.numel(psi0)

    def loss_gradient_psi(self, x, y, batch) -> Dict[str, torch.Tensor]:
        """``R_ℓ = ∂_{Ψ_ℓ} L`` at the current point."""
        psi0 = self.psi_point(x, y)
        head = self.head_of(pt.detach(y))
        return grad(lambda d: self.loss_of_deltas(d, head, batch))(psi0)

    def beta_blocks(self, x, y, batch, max_block: int = 4000):
        """The blocks of ``A = ∂_Ψ L · ∂²_B Ψ`` (Euclidean bases): A is block-diagonal over
        (layer, component) because Ψ_ℓ = Σ_i s_i ⊗_k u_i^{(k)} couples only the columns of one
        component. Yields ``(layer, i, dense block)``."""
        R = self.loss_gradient_psi(x, y, batch)
        facs = self.factors(pt.detach(y))
        ss = self.split_s(x["s"].detach())
        for l in self.layers:
            dims = list(l.shape)
            n = sum(dims)
            if n > max_block:
                raise ValueError(f"block of size {n} for layer {l.name} exceeds max_block={max_block}")
            for i in range(l.rank):
                cols0 = torch.cat([facs[l.name][k][:, i] for k in range(l.order)])

                def h(c, l=l, i=i):
                    parts = list(torch.split(c, dims))
                    return l.scale * ss[l.name][i] * (R[l.name] * _outer(parts)).sum()

                H = torch.func.hessian(h)(cols0)
                yield l.name, i, 0.5 * (H + H.T)


def _outer(vectors: List[torch.Tensor]) -> torch.Tensor:
    letters = string.ascii_lowercase[:len(vectors)]
    return torch.einsum(",".join(letters) + "->" + letters, *vectors)


def adapter_crosscheck(ap: AdapterProblem, s: torch.Tensor, y) -> dict:
    """The problem runs debora's adapters: the loss through the problem's functional path, the live
    adapted model (s and retracted bases written into it) and a ``debora.merge_and_unload`` copy
    (dense W0 + ΔW) agree; and the library's ``debora-closed-form`` equals Euler's identity
    ``(1 − d)·∂_s f1`` (Euclidean basis gradients) / ``∂_s f1`` (Riemannian, manifold bases).
    Returns max abs differences and scales."""
    import copy
    x = {"s": s}
    batch = ap.D1
    f_problem = float(ap.task_loss(x, y, batch))
    ap.write(x, y)
    args, kwargs = ap.inputs(batch)
    with torch.no_grad():
        f_model = float(ap.loss_fn(ap.model(*args, **kwargs), batch))
        merged = debora.merge_and_unload(copy.deepcopy(ap.model))
        f_merged = float(ap.loss_fn(merged(*args, **kwargs), batch))
    fo = bilevel.estimators.get("first-order")(ap.problem, x, pt.detach(y), batch, batch).grad["s"]
    out = {"f_model_diff": abs(f_problem - f_model), "f_merged_diff": abs(f_problem - f_merged),
           "f_scale": abs(f_problem), "dense_types": sorted({type(m).__name__ for m in ap.adapters.values()})}
    ds = torch.cat([torch.full((l.rank,), float(l.order), dtype=fo.dtype) for l in ap.layers])
    G = ap.closed_form(x, y, batch)["s"]
    out["euclidean"] = float((G - (1 - ds) * fo).abs().max())
    out["euclidean_scale"] = float(((1 - ds) * fo).abs().max())
    if ap.basis != "euclidean":
        Gr = ap.closed_form(x, y, batch, riemannian=True)["s"]
        out["riemannian"] = float((Gr - fo).abs().max())
    else:
        out["riemannian"] = 0.0
    return out


def flat_x(x) -> torch.Tensor:
    return x["s"].detach().reshape(-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()) / (na * nb))


def rel_error(est: torch.Tensor, ref: torch.Tensor) -> float:
    nr = float(ref.norm())
    return float((est - ref).norm()) / nr if nr > 0 else math.inf
