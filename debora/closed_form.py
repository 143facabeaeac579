"""dEBORA's closed-form hypergradient (the paper's Theorem 4.1), as a ``bilevel`` estimator.

    G(s) = ∂_s f1 − diag( Σ_k U^{(k)ᵀ} ∂_{U^{(k)}} f1 ) ⊙ s⁻¹

per layer, with bases ``(U, V)`` for matrix adapters (d = 2) and ``(A, B, C, D)`` for CP conv
adapters (d = 4). ``diag(Uᵀ G_U)`` is the column-wise inner product ``Σ_j U_jβ (G_U)_jβ``. It comes
from ``∂_{s_η} U^{(k)}_{jβ} = −δ_{βη} U^{(k)}_{jβ} / s_β`` (bases shrink as s grows), valid when the
task loss has a small Hessian in ΔW; whether G is close to the true hypergradient is measured by
theory_checks, not assumed here.

An identity worth knowing (tested in tests/test_debora_closed_form.py): the loss depends on
component i only through ``s_i · u_i^{(1)} ⊗ … ⊗ u_i^{(d)}``, which is 1-homogeneous in s_i and in
each u_i^{(k)}; by Euler's theorem ``diag(U^{(k)ᵀ} ∂_{U^{(k)}} f1) = s ⊙ ∂_s f1`` for *every* basis, at
every point. Hence, exactly,

    G(s) = (1 − d) · ∂_s f1        with Euclidean basis gradients (d = 2: −∂_s f1; CP: −3 ∂_s f1)
    G(s) = ∂_s f1                  with Riemannian gradients on oblique / Stiefel bases.

The estimator still evaluates the formula as written (so it stays correct for any problem that
follows the naming convention but is not built from these adapters), but users should know that
it carries no information beyond ``∂_s f1``.

Cost: one backward pass of f1 (``problem.upper_grads``) for all layers, then per layer an O(r·n)
reduction (no host sync, no Hessian-vector products).

    est = bilevel.estimators.get("debora-closed-form", basis_grad="euclidean")
    res = est(problem, x, y, upper_batch, lower_batch)      # lower_batch is not used

Key convention (derived from names, so any problem following it works, not only
:func:`debora.bilevel_problem`): an x key ``"<layer>.s"`` (or ``"s"``) has as bases the y keys
``"<layer>.U"``, ``"<layer>.V"``, ``"<layer>.A"`` … ``"<layer>.D"`` that exist. Other y entries
(classifier head, …) are ignored. An x key without any basis raises ``ValueError``.

``basis_grad``:
  * ``"euclidean"`` (default): ``∂_U f1`` is the plain Euclidean gradient. This is the paper's
    derivation (an implicit-function argument in the ambient space, ``∂_s U = −U/s``), so the default
    is the paper's formula as stated; it is also the only choice under which the correction term
    is not trivially zero: on the oblique and Stiefel manifolds
    ``diag(Uᵀ P_U(G)) = 0`` for every G (the implicit direction −U_η/s_η rescales a column, which is
    normal to these manifolds), so ``"riemannian"`` reduces G to ``∂_s f1`` (the ``first-order``
    estimator) there. For Euclidean bases the two options coincide.
  * ``"riemannian"``: project ``∂_U f1`` on the tangent space of the basis manifold first. The
    manifold of each basis comes from ``basis_kinds=`` or from ``problem.basis_kinds`` (set by
    :func:`debora.bilevel_problem`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from bilevel.estimators import Estimator, EstimatorInfo

from . import manifolds

BASIS_NAMES = ("U", "V", "A", "B", "C", "D")
BASIS_GRADS = ("euclidean", "riemannian")


def basis_groups(x, y) -> Dict[str, List[str]]:
    """``{x key: [its basis keys in y]}`` by the naming convention."""
    groups = {}
    for k in x:
        if not (k == "s" or k.endswith(".s")):
            raise ValueError(f"x key {k!r} is not a dEBORA rank-weight name ('<layer>.s'); the closed "
                             "form needs x = debora.upper_parameters(model)")
        prefix = k[:-1]
        bases = [prefix + b for b in BASIS_NAMES if prefix + b in y]
        if not bases:
            raise ValueError(f"no basis for {k!r} in y (expected keys like {prefix + 'U'!r}); the "
                             "closed form needs y = debora.lower_parameters(model)")
        groups[k] = bases
    return groups


class DeboraClosedForm(Estimator):
    """``G(s) = ∂_s f1 − diag(Σ_k U^{(k)ᵀ} ∂_{U^{(k)}} f1) ⊙ s⁻¹`` (see module doc)."""

    name = "debora-closed-form"

    def __init__(self, basis_grad: str = "euclidean", basis_kinds: Optional[Dict[str, str]] = None):
        if basis_grad not in BASIS_GRADS:
            raise ValueError(f"basis_grad must be one of {BASIS_GRADS}, got {basis_grad!r}")
        self.basis_grad = basis_grad
        self.basis_kinds = basis_kinds

    def _kinds(self, problem):
        kinds = self.basis_kinds if self.basis_kinds is not None else getattr(problem, "basis_kinds", None)
        if kinds is None:
            raise ValueError("basis_grad='riemannian' needs the manifold of every basis: pass "
                             "basis_kinds={name: 'oblique'|'stiefel'|'euclidean'} or build the problem "
                             "with debora.bilevel_problem")
        return kinds

    def estimate(self, problem, x, y, upper_batch, lower_batch):
        groups = basis_groups(x, y)
        kinds = self._kinds(problem) if self.basis_grad == "riemannian" else None
        gx, gy, value = problem.upper_grads(x, y, upper_batch)
        grad = {}
        for k, bases in groups.items():
            corr = None
            for b in bases:
                g = gy[b]
                if kinds is not None:
                    g = manifolds.project(kinds.get(b, "euclidean"), y[b], g)
                term = (y[b] * g).sum(0)
                corr = term if corr is None else corr + term
            grad[k] = gx[k] - corr / x[k]
        return grad, EstimatorInfo(upper_value=value, extra={"basis_grad": self.basis_grad})
