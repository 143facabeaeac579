"""Basis manifolds: tangent projection of gradients and retraction after an optimizer step.

A basis ``X`` (shape ``n × r``, one column per rank-one component) lives on

* ``"euclidean"``: ``R^{n×r}``; projection and retraction are the identity;
* ``"oblique"``: unit-norm columns, ``diag(XᵀX) = 1``.
  Tangent projection ``P_X(G) = G − X diag(diag(XᵀG))``; retraction: normalise each column;
* ``"stiefel"``: orthonormal columns, ``XᵀX = I`` (needs ``r ≤ n``).
  Tangent projection ``P_X(G) = G − X sym(XᵀG)``; retraction: QR with ``diag(R) ≥ 0``.

The trainer's lower step on a model is::

    loss.backward()
    debora.project_gradients(model)   # .grad of every basis ← its tangent projection
    optimizer.step()
    debora.retract(model)             # bases back on the manifold, in place (same Parameter objects)

or, in one call, ``debora.manifold_step(model, optimizer)``. For Euclidean bases both helpers are
no-ops. Which manifold each basis lives on is the layer's ``basis_kinds`` (CP conv adapters with
``basis="stiefel"`` keep C and D oblique: kernel factors have fewer rows than r).

Note (why the closed-form hypergradient defaults to Euclidean basis gradients): for the oblique and
Stiefel manifolds, ``diag(Xᵀ P_X(G)) = 0`` identically, so the correction term of the paper's closed
form vanishes when tangent-projected gradients are used (see :mod:`debora.closed_form`).
"""
from __future__ import annotations

from typing import Dict

import torch

KINDS = ("euclidean", "oblique", "stiefel")


def project(kind: str, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Tangent projection ``P_X(G)`` of a gradient ``G`` at the basis ``X`` (out of place)."""
    if kind == "euclidean":
        return G
    if kind == "oblique":
        return G - X * (X * G).sum(0, keepdim=True)
    if kind == "stiefel":
        XtG = X.transpose(-1, -2) @ G
        return G - X @ (0.5 * (XtG + XtG.transpose(-1, -2)))
    raise ValueError(f"unknown basis manifold {kind!r}; use one of {KINDS}")


def retraction(kind: str, X: torch.Tensor) -> torch.Tensor:
    """A point of the manifold close to ``X`` (out of place)."""
    if kind == "euclidean" or X.shape[-1] == 0:
        return X
    if kind == "oblique":
        return X / X.norm(dim=0, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    if kind == "stiefel":
        Q, R = torch.linalg.qr(X)
        sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return Q * sign.unsqueeze(-2)
    raise ValueError(f"unknown basis manifold {kind!r}; use one of {KINDS}")


def random_point(kind: str, n: int, r: int, generator=None, dtype=torch.float32) -> torch.Tensor:
    """A random basis on the manifold (Gaussian columns, then retracted)."""
    X = torch.randn(n, r, generator=generator, dtype=dtype)
    if kind == "euclidean":
        return X
    return retraction(kind, X)


def _basis_params(model):
    from .layers import adapter_layers
    for lname, layer in adapter_layers(model).items():
        for pname, kind in layer.basis_kinds.items():
            yield f"{lname}.{pname}", kind, getattr(layer, pname)


@torch.no_grad()
def project_gradients(model) -> None:
    """Replace ``.grad`` of every non-Euclidean basis by its tangent projection (in place)."""
    for _, kind, p in _basis_params(model):
        if kind != "euclidean" and p.grad is not None:
            p.grad.copy_(project(kind, p, p.grad))


@torch.no_grad()
def retract(model) -> None:
    """Retract every non-Euclidean basis onto its manifold, in place (Parameters keep their identity)."""
    for _, kind, p in _basis_params(model):
        if kind != "euclidean":
            p.copy_(retraction(kind, p))


def manifold_step(model, optimizer) -> None:
    """``project_gradients(model)``, ``optimizer.step()``, ``retract(model)``."""
    project_gradients(model)
    optimizer.step()
    retract(model)


def basis_kinds(model) -> Dict[str, str]:
    """``{full basis parameter name: manifold}`` for every adapter basis."""
    return {name: kind for name, kind, _ in _basis_params(model)}
