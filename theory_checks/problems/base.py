"""A bilevel rank-selection problem with an explicit multilinear adapter parametrisation.

For every adapted layer ℓ (frozen weight ``W0_ℓ``) the update is

    Ψ_ℓ(B_ℓ, s_ℓ) = scale · Σ_i s_i u_i^{(1)} ⊗ … ⊗ u_i^{(d)}        (d = 2: U diag(s) Vᵀ; d = 4: CP)

and the task loss sees ``W0_ℓ + Ψ_ℓ``. The upper variable is x = {"s": all layers' s concatenated}
(one global budget), the lower variable y holds the (ambient) bases ``Ũ^{(k)}_ℓ`` and the trainable
head. Bases on a manifold are reached through a smooth retraction inside the losses,
``U = R(Ũ)`` (oblique: column normalisation; Stiefel: polar factor by Newton–Schulz), plus a gauge
penalty ``μ/4 ‖c(Ũ)‖²`` on the constraint residual; at a feasible Ũ the retraction's differential
is the tangent projection, so ∂_Ũ f1 is the Riemannian gradient and the implicit-function
hypergradient in Ũ equals the Riemannian one (the normal directions decouple).

Lower loss (paper f2, on D2) with the damping we report:

    g(s, y) = L(W0 + Ψ(R(Ũ), s); D2) + λ/2 ‖y‖² + μ/4 Σ ‖c(Ũ)‖²

``λ`` (``weight_decay``) makes ∂²_yy g non-singular along the scaling symmetry of Euclidean bases
(U diag(s) Vᵀ = (U D) diag(s) (V D⁻¹)); its value is part of every report. Upper loss: f1 = L(…; D1).
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.func import grad

import bilevel
from bilevel import pytree as pt

BASES = ("euclidean", "oblique", "stiefel")


@dataclass
class LayerSpec:
    name: str
    shape: tuple             # (out, in) for d = 2; (out, in, kh, kw) for CP d = 4
    rank: int
    scale: float = 1.0       # alpha / r0

    @property
    def order(self) -> int:
        return len(self.shape)


def split_halves(data: Dict[str, torch.Tensor], perm: torch.Tensor):
    """``(D1, D2)``: the first and second half of ``perm`` applied to every tensor of ``data``."""
    half = perm.numel() // 2
    return ({k: v[perm[:half]] for k, v in data.items()},
            {k: v[perm[half:]] for k, v in data.items()})


def distinct_s0(n: int, tau: float, eps: float) -> torch.Tensor:
    """A feasible start with distinct weights ``ε + 0.8 τ w/Σw``, w = (n, …, 1): equal s_i would add a
    rotation symmetry among components (a singular ∂²_BB g)."""
    w = torch.arange(n, 0, -1, dtype=torch.float64)
    return eps + 0.8 * tau * w / w.sum()


def multilinear(factors: List[torch.Tensor], s: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · Σ_i s_i ⊗_k factors[k][:, i]`` (any order d)."""
    letters = string.ascii_lowercase[:len(factors)]
    expr = ",".join(f"{c}z" for c in letters) + ",z->" + letters
    return scale * torch.einsum(expr, *factors, s)


def _inv_sqrt_newton_schulz(A: torch.Tensor, iters: int = 12) -> torch.Tensor:
    """``A^{-1/2}`` of an SPD matrix near I by coupled Newton–Schulz (polynomial: any-order autodiff)."""
    c = torch.linalg.matrix_norm(A, ord="fro")
    Y = A / c
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    Z = eye
    for _ in range(iters):
        T = 0.5 * (3.0 * eye - Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Z / torch.sqrt(c)


def retract(U: torch.Tensor, basis: str) -> torch.Tensor:
    if basis == "euclidean":
        return U
    if basis == "oblique":
        return U / U.norm(dim=0, keepdim=True)
    if basis == "stiefel":
        if U.shape[0] < U.shape[1]:
            raise ValueError(f"a Stiefel basis needs rows >= columns, got shape {tuple(U.shape)}")
        return U @ _inv_sqrt_newton_schulz(U.T @ U)
    raise ValueError(f"basis={basis!r} is not one of {BASES}")


def project_tangent(U: torch.Tensor, G: torch.Tensor, basis: str) -> torch.Tensor:
    """Riemannian gradient: projection of the Euclidean gradient G onto the tangent space at U."""
    if basis == "euclidean":
        return G
    if basis == "oblique":
        return G - U * (U * G).sum(0, keepdim=True)
    if basis == "stiefel":
        S = U.T @ G
        return G - U @ (0.5 * (S + S.T))
    raise ValueError(f"basis={basis!r} is not one of {BASES}")


def gauge_residual(U: torch.Tensor, basis: str) -> torch.Tensor:
    if basis == "oblique":
        return (U * U).sum(0) - 1.0
    if basis == "stiefel":
        return U.T @ U - torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return U.new_zeros(())


Batch = Dict[str, torch.Tensor]


class AdapterProblem:
    """Bilevel problem ``min_s f1(B*(s), s)`` with ``B*(s) = argmin_B g(s, B)`` (see module doc).

    Args:
        layers: the adapted layers.
        frozen: ``{layer name: W0}``.
        head: initial trainable head parameters (part of y), may be empty.
        forward: ``forward(weights, head, batch) -> output`` with ``weights[name] = W0 + Ψ``.
        loss: ``loss(output, batch) -> scalar``.
        D1, D2: dicts of tensors with a common first dimension (the examples).
    """

    def __init__(self, name: str, layers: List[LayerSpec], frozen: Dict[str, torch.Tensor],
                 head: Dict[str, torch.Tensor], forward: Callable, loss: Callable, D1: Batch, D2: Batch,
                 basis: str = "euclidean", tau: float = 1.0, eps: float = 1e-3,
                 weight_decay: float = 1e-2, gauge: float = 1.0, s0: Optional[torch.Tensor] = None,
                 init_scale: float = 1.0, seed: int = 0, description: str = "",
                 restricted: str = ""):
        if basis not in BASES:
            raise ValueError(f"basis={basis!r} is not one of {BASES}")
        self.name, self.layers, self.frozen, self.basis = name, layers, frozen, basis
        self.forward_fn, self.loss_fn = forward, loss
        self.D1, self.D2 = D1, D2
        self.tau, self.eps, self.weight_decay, self.gauge = tau, eps, weight_decay, gauge
        self.description, self.restricted = description, restricted
        self.dtype = next(iter(frozen.values())).dtype
        self.device = next(iter(frozen.values())).device
        self.r_total = sum(l.rank for l in layers)
        self.blocks = [l.rank for l in layers]
        gen = torch.Generator().manual_seed(seed)
        y: Dict[str, torch.Tensor] = {}
        for l in layers:
            for k, n in enumerate(l.shape):
                U = torch.randn(n, l.rank, generator=gen, dtype=torch.float64)
                U = U / U.norm(dim=0, keepdim=True) * init_scale      # columns of norm init_scale
                if basis != "euclidean":
                    U = retract(U, basis)
                y[self._key(l, k)] = U.to(self.dtype).to(self.device)
        for k, v in head.items():
            y["head:" + k] = v.detach().clone()
        self.y_init = y
        if s0 is None:
            s0 = torch.full((self.r_total,), eps + 0.8 * tau / self.r_total, dtype=torch.float64)
        self.x0 = {"s": s0.to(self.dtype).to(self.device)}
        self.problem = bilevel.BilevelProblem(self.upper_loss, self.lower_loss)

    # -- structure ---------------------------------------------------------------------------------
    @staticmethod
    def _key(layer: LayerSpec, k: int) -> str:
        return f"U{k}:{layer.name}"

    def basis_keys(self) -> List[str]:
        return [self._key(l, k) for l in self.layers for k in range(l.order)]

    def head_of(self, y) -> Dict[str, torch.Tensor]:
        return {k[5:]: v for k, v in y.items() if k.startswith("head:")}

    def split_s(self, s: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, i = {}, 0
        for l in self.layers:
            out[l.name] = s[i:i + l.rank]
            i += l.rank
        return out

    def factors(self, y) -> Dict[str, List[torch.Tensor]]:
        """Retracted bases per layer (the U^{(k)} the adapter actually uses)."""
        return {l.name: [retract(y[self._key(l, k)], self.basis) for k in range(l.order)]
                for l in self.layers}

    def deltas_from(self, s: torch.Tensor, factors) -> Dict[str, torch.Tensor]:
        ss = self.split_s(s)
        return {l.name: multilinear(factors[l.name], ss[l.name], l.scale) for l in self.layers}

    def weights(self, deltas) -> Dict[str, torch.Tensor]:
        return {n: self.frozen[n] + deltas[n] for n in self.frozen}

    # -- losses ------------------------------------------------------------------------------------
    def loss_of_deltas(self, deltas, head, batch) -> torch.Tensor:
        """Task loss L as a function of Ψ (the ΔW of every adapted layer) and the head."""
        return self.loss_fn(self.forward_fn(self.weights(deltas), head, batch), batch)

    def task_loss(self, x, y, batch) -> torch.Tensor:
        return self.loss_of_deltas(self.deltas_from(x["s"], self.factors(y)), self.head_of(y), batch)

    def upper_loss(self, x, y, batch):
        return self.task_loss(x, y, batch)

    def regulariser(self, y) -> torch.Tensor:
        # weight decay on Euclidean bases and the head; manifold bases have a fixed norm, so they
        # get only the gauge penalty (its minimum is on the manifold, where g's minimiser then lies)
        reg = sum(0.5 * self.weight_decay * (v * v).sum() for k, v in y.items()
                  if self.basis == "euclidean" or not k.startswith("U"))
        if self.basis != "euclidean":
            for k in self.basis_keys():
                c = gauge_residual(y[k], self.basis)
                reg = reg + 0.25 * self.gauge * (c * c).sum()
        return reg

    def lower_loss(self, x, y, batch):
        return self.task_loss(x, y, batch) + self.regulariser(y)

    def retract_y(self, y):
        """Put the ambient bases back on the manifold (after an optimiser step)."""
        if self.basis == "euclidean":
            return y
        return {k: (retract(v, self.basis) if k.startswith("U") else v) for k, v in y.items()}

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

    # -- the closed form of Theorem 4.1 ------------------------------------------------------------
    def closed_form(self, x, y, batch, riemannian: bool = False) -> Dict[str, torch.Tensor]:
        """``G(s) = ∂_s f1 − diag(Σ_k U^{(k)ᵀ} ∂_{U^{(k)}} f1) ⊙ s⁻¹`` per layer.

        ∂_{U^{(k)}} f1 is the Euclidean gradient with respect to the basis the adapter uses (the
        retracted one), or its tangent projection (``riemannian=True``)."""
        facs = self.factors(pt.detach(y))
        head = self.head_of(pt.detach(y))

        def f1(s, facs_):
            return self.loss_of_deltas(self.deltas_from(s, facs_), head, batch)

        gs, gU = grad(f1, argnums=(0, 1))(x["s"].detach(), facs)
        corr = torch.zeros_like(gs)
        i = 0
        for l in self.layers:
            acc = torch.zeros(l.rank, dtype=gs.dtype, device=gs.device)
            for k in range(l.order):
                U, G = facs[l.name][k], gU[l.name][k]
                if riemannian:
                    G = project_tangent(U, G, self.basis)
                acc = acc + (U * G).sum(0)
            corr[i:i + l.rank] = acc
            i += l.rank
        return {"s": gs - corr / x["s"].detach()}

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
