"""Random strongly convex quadratic bilevel problems with a closed-form hypergradient.

Used by the tests and the benchmark. With y ∈ R^m and x ∈ R^n split into several named tensors,

    g(x, y) = ½ yᵀ H y + yᵀ C x + dᵀ y            H = U diag(λ) Uᵀ,  λ ∈ [μ, L],  κ = L/μ
    f(x, y) = ½ yᵀ P y + yᵀ Q x + ½ xᵀ R x + aᵀ y + cᵀ x

so that ``y*(x) = −H⁻¹(C x + d)`` and, with ``v* = H⁻¹ ∂_y f``,

    ∇F(x) = ∂_x f − ∂²_xy g · v* = (Qᵀ y* + R x + c) − Cᵀ H⁻¹ (P y* + Q x + a).

A stochastic version draws the lower Hessian as ``H_ξ = H + E_ξ`` with zero-mean symmetric noise
``E_ξ`` whose variance falls like 1/batch_size (see :meth:`QuadraticBilevel.stochastic_lower_batches`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import torch

from . import pytree as pt
from .problem import BilevelProblem

Tree = Dict[str, torch.Tensor]


def _split(total: int, parts: int, gen: torch.Generator) -> List[int]:
    parts = max(1, min(parts, total))
    cuts = sorted(torch.randperm(total - 1, generator=gen)[:parts - 1].add(1).tolist()) if parts > 1 else []
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _shapes(sizes: Sequence[int]) -> List[tuple]:
    """Mix vector and matrix leaves: a size that factors as a·b (a, b ≥ 2) becomes an (a, b) tensor."""
    out = []
    for i, s in enumerate(sizes):
        a = next((d for d in range(2, int(math.isqrt(s)) + 1) if s % d == 0), None)
        out.append((a, s // a) if (a is not None and i % 2 == 1) else (s,))
    return out


@dataclass
class QuadraticBilevel:
    H: torch.Tensor
    C: torch.Tensor
    d: torch.Tensor
    P: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor
    x_shapes: Dict[str, tuple]
    y_shapes: Dict[str, tuple]

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def random(cls, n_outer: int, n_inner: int, kappa: float = 10.0, mu: float = 1.0,
               x_parts: int = 1, y_parts: int = 1, seed: int = 0, dtype=torch.float64,
               device="cpu", cross_scale: float = 1.0) -> "QuadraticBilevel":
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        m, n = n_inner, n_outer
        U, _ = torch.linalg.qr(randn(m, m))
        lam = mu * torch.logspace(0, math.log10(kappa), m, dtype=torch.float64) if m > 1 else \
            torch.tensor([mu], dtype=torch.float64)
        H = (U * lam) @ U.T
        H = 0.5 * (H + H.T)
        G = randn(m, m) / math.sqrt(m)
        P = G @ G.T + 0.1 * torch.eye(m, dtype=torch.float64)
        S = randn(n, n) / math.sqrt(n)
        R = S @ S.T + 0.1 * torch.eye(n, dtype=torch.float64)
        kw = dict(dtype=dtype, device=device)
        xs = _split(n, x_parts, gen)
        ys = _split(m, y_parts, gen)
        return cls(H=H.to(**kw), C=(cross_scale * randn(m, n)).to(**kw), d=randn(m).to(**kw),
                   P=P.to(**kw), Q=randn(m, n).to(**kw), R=R.to(**kw), a=randn(m).to(**kw),
                   c=randn(n).to(**kw),
                   x_shapes={f"x{i}": s for i, s in enumerate(_shapes(xs))},
                   y_shapes={f"y{i}": s for i, s in enumerate(_shapes(ys))})

    # -- pytrees <-> vectors -----------------------------------------------------------------------
    def vec_x(self, x: Tree) -> torch.Tensor:
        return torch.cat([x[k].reshape(-1) for k in self.x_shapes])

    def vec_y(self, y: Tree) -> torch.Tensor:
        return torch.cat([y[k].reshape(-1) for k in self.y_shapes])

    def tree(self, vec: torch.Tensor, shapes: Dict[str, tuple]) -> Tree:
        out, i = {}, 0
        for k, s in shapes.items():
            size = math.prod(s)
            out[k] = vec[i:i + size].reshape(s)
            i += size
        return out

    def tree_x(self, vec):
        return self.tree(vec, self.x_shapes)

    def tree_y(self, vec):
        return self.tree(vec, self.y_shapes)

    def random_x(self, seed: int = 1) -> Tree:
        gen = torch.Generator().manual_seed(seed)
        n = self.C.shape[1]
        return self.tree_x(torch.randn(n, generator=gen, dtype=torch.float64).to(self.C))

    # -- losses ------------------------------------------------------------------------------------
    def upper_loss(self, x: Tree, y: Tree, batch=None) -> torch.Tensor:
        xv, yv = self.vec_x(x), self.vec_y(y)
        return 0.5 * yv @ (self.P @ yv) + yv @ (self.Q @ xv) + 0.5 * xv @ (self.R @ xv) \
            + self.a @ yv + self.c @ xv

    def lower_loss(self, x: Tree, y: Tree, batch=None) -> torch.Tensor:
        """``g``; a ``batch`` that is a symmetric (m, m) tensor E_ξ gives ``½ yᵀ(H + E_ξ)y + …``."""
        xv, yv = self.vec_x(x), self.vec_y(y)
        Hb = self.H if batch is None else self.H + batch
        return 0.5 * yv @ (Hb @ yv) + yv @ (self.C @ xv) + self.d @ yv

    def problem(self) -> BilevelProblem:
        return BilevelProblem(self.upper_loss, self.lower_loss)

    # -- closed forms ------------------------------------------------------------------------------
    @property
    def mu(self) -> float:
        return float(torch.linalg.eigvalsh(self.H).min())

    @property
    def L(self) -> float:
        return float(torch.linalg.eigvalsh(self.H).max())

    def y_star(self, x: Tree) -> Tree:
        return self.tree_y(-torch.linalg.solve(self.H, self.C @ self.vec_x(x) + self.d))

    def grad_y_f(self, x: Tree, y: Tree) -> torch.Tensor:
        return self.P @ self.vec_y(y) + self.Q @ self.vec_x(x) + self.a

    def grad_x_f(self, x: Tree, y: Tree) -> torch.Tensor:
        return self.Q.T @ self.vec_y(y) + self.R @ self.vec_x(x) + self.c

    def v_star(self, x: Tree) -> torch.Tensor:
        """``v* = H⁻¹ ∂_y f`` at ``(x, y*(x))``."""
        return torch.linalg.solve(self.H, self.grad_y_f(x, self.y_star(x)))

    def hypergradient(self, x: Tree) -> torch.Tensor:
        """``∇F(x)`` as a flat vector."""
        ys = self.y_star(x)
        return self.grad_x_f(x, ys) - self.C.T @ self.v_star(x)

    def scale(self, x: Tree) -> float:
        """``‖∂_x f‖ + ‖C‖₂‖v*‖``: the size of the two terms whose difference is ∇F (the natural
        denominator of a relative rounding error, immune to cancellation in the difference)."""
        ys = self.y_star(x)
        return float(self.grad_x_f(x, ys).norm() + torch.linalg.matrix_norm(self.C, 2) * self.v_star(x).norm())

    def neumann_error(self, x: Tree, eta: float, terms: int) -> torch.Tensor:
        """``ĝ_K − ∇F = Cᵀ (I − ηH)^K v*`` for the K-term Neumann estimate (flat vector)."""
        M = torch.eye(self.H.shape[0], dtype=self.H.dtype, device=self.H.device) - eta * self.H
        return self.C.T @ (torch.linalg.matrix_power(M, terms) @ self.v_star(x))

    # -- stochastic lower batches -------------------------------------------------------------------
    def stochastic_lower_batches(self, batch_size: int, noise: float = 0.3,
                                 seed: int = 0) -> Iterator[torch.Tensor]:
        """Endless zero-mean symmetric Hessian perturbations ``E_ξ = (1/B) Σ_{i≤B} s (z_i z_iᵀ − I)``,
        ``z_i ~ N(0, I)``: ``E[E_ξ] = 0`` and ``Var`` ∝ 1/B. ``s = noise·μ/√m`` keeps ``H + E_ξ`` mostly
        positive definite for B ≥ 1."""
        gen = torch.Generator().manual_seed(seed)
        m = self.H.shape[0]
        s = noise * self.mu / math.sqrt(m)
        eye = torch.eye(m, dtype=torch.float64)
        while True:
            Z = torch.randn(batch_size, m, generator=gen, dtype=torch.float64)
            yield (s * (Z.T @ Z / batch_size - eye)).to(self.H)


def relative_error(est: Tree, true_vec: torch.Tensor, scale: float) -> float:
    """``‖est − true‖ / scale`` with ``est`` a pytree flattened in its key order."""
    return float((pt.flatten(est) - true_vec).norm() / scale)
