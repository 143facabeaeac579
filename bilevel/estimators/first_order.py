"""First-order baseline: ``∇F ≈ ∂_x f(x, y)``, ignoring how y*(x) moves with x. One backward pass."""
from __future__ import annotations

from .base import Estimator, EstimatorInfo


class FirstOrder(Estimator):
    name = "first-order"
    options = ()     # no Hessian, no solve: damping, eta, tol ... do not apply (get() says so)

    def estimate(self, problem, x, y, upper_batch, lower_batch):
        gx, _, value = problem.upper_grads(x, y, upper_batch)
        return gx, EstimatorInfo(upper_value=value)
