"""The bilevel problem and its matrix-free derivative operators.

    min_x  F(x) := f(x, y*(x))        subject to   y*(x) ∈ argmin_y g(x, y)

``f`` is the *upper* loss (paper: f1 on D1), ``g`` the *lower* loss (paper: f2 on D2). Both are
callables ``(x, y, batch) -> scalar Tensor`` with ``x`` and ``y`` dicts of tensors. By the implicit
function theorem, where ``∂²_yy g`` is invertible,

    ∇F(x) = ∂_x f − ∂²_{xy} g · [∂²_{yy} g]⁻¹ ∂_y f .

:class:`LowerOperators` exposes the two products the estimators need, without forming a matrix:

* ``hvp(v)   = ∂²_{yy} g · v``  — forward-over-reverse (``jvp`` of ``grad``) by default, with a
  double-backward fallback for ops that lack forward-mode rules, or cached reverse-over-reverse.
* ``mixed(v) = ∂²_{xy} g · v = ∂_x <∂_y g, v>``  — ``vjp`` of ``grad``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torch.func import grad, jvp, vjp

from . import pytree as pt
from .pytree import Tree

Loss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Any], torch.Tensor]

HVP_MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")


def _scalar(loss_value: torch.Tensor, which: str) -> torch.Tensor:
    if not isinstance(loss_value, torch.Tensor):
        raise TypeError(f"{which} must return a scalar torch.Tensor, got {type(loss_value).__name__}")
    if loss_value.dim() != 0:
        raise ValueError(f"{which} must return a scalar (0-dim) tensor, got shape "
                         f"{tuple(loss_value.shape)}; reduce it, e.g. with .mean() or .sum()")
    return loss_value


@dataclass
class BilevelProblem:
    """A bilevel problem given by its two losses.

    Args:
        upper_loss: ``f(x, y, batch) -> scalar`` (paper: f1, evaluated on D1 batches).
        lower_loss: ``g(x, y, batch) -> scalar`` (paper: f2, evaluated on D2 batches); must be
            (locally) strongly convex in ``y`` for the implicit hypergradient to exist.
    """

    upper_loss: Loss
    lower_loss: Loss
    _checked: bool = field(default=False, init=False, repr=False)
    _hvp_fallback: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        for name in ("upper_loss", "lower_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a callable (x, y, batch) -> scalar Tensor, "
                                f"got {type(getattr(self, name)).__name__}")

    # -- scalar losses with shape checks ---------------------------------------------------------
    def f(self, x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        return _scalar(self.upper_loss(x, y, batch), "upper_loss")

    def g(self, x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        return _scalar(self.lower_loss(x, y, batch), "lower_loss")

    # -- first derivatives ------------------------------------------------------------------------
    def upper_grads(self, x: Tree, y: Tree, batch: Any) -> Tuple[Tree, Tree, torch.Tensor]:
        """``(∂_x f, ∂_y f, f)`` from one backward pass."""
        def f_aux(x_, y_, b_):
            value = self.f(x_, y_, b_)
            return value, value.detach()

        (gx, gy), value = grad(f_aux, argnums=(0, 1), has_aux=True)(x, y, batch)
        return gx, gy, value

    def lower_grad_y(self, x: Tree, y: Tree, batch: Any) -> Tree:
        return grad(self.g, argnums=1)(x, y, batch)

    def operators(self, x: Tree, y: Tree, batch: Any, hvp_mode: str = "auto") -> "LowerOperators":
        return LowerOperators(self, x, y, batch, hvp_mode)

    # -- validation -------------------------------------------------------------------------------
    def validate(self, x: Tree, y: Tree, upper_batch: Any, lower_batch: Any) -> None:
        """Check pytrees and that ``g`` depends on every tensor of ``y`` (else ∂²_yy g is singular).

        Runs once per problem (the first time an estimator sees it): one forward+backward of g.
        """
        pt.check_tree(x, "x")
        pt.check_tree(y, "y")
        shared = sorted(set(x) & set(y))
        if shared:
            raise ValueError(f"x and y share the keys {shared}; give upper and lower variables "
                             f"distinct names")
        if self._checked:
            return
        y_req = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        x_det = pt.detach(x)
        with torch.enable_grad():
            value = self.g(x_det, y_req, lower_batch)
            if not value.requires_grad:
                raise ValueError("lower_loss does not depend on y: its value has no gradient with "
                                 f"respect to any of {sorted(y)}; the lower problem min_y g(x, y) "
                                 "must involve y")
            grads = torch.autograd.grad(value, list(y_req.values()), allow_unused=True)
        unused = [k for k, g_ in zip(y_req, grads) if g_ is None]
        if unused:
            raise ValueError(f"lower_loss does not depend on y{unused}: ∂²_yy g would be singular. "
                             "Remove those entries from y or make the lower loss use them")
        self.f(x_det, pt.detach(y), upper_batch)  # scalar check of the upper loss
        self._checked = True


class LowerOperators:
    """Matrix-free ``∂²_{yy} g`` and ``∂²_{xy} g`` at a fixed ``(x, y, batch)``; counts products.

    ``hvp_mode``:
      * ``"forward-over-reverse"``: ``jvp(grad_y g)`` — no graph kept between products;
      * ``"reverse-over-reverse"``: builds ``∂_y g`` with ``create_graph`` once, then each product is
        one backward through that graph (fastest for many products; holds the graph in memory);
      * ``"auto"``: forward-over-reverse, falling back to double backward when an op has no
        forward-mode rule (remembered per problem).
    """

    def __init__(self, problem: BilevelProblem, x: Tree, y: Tree, batch: Any, hvp_mode: str = "auto"):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        self.problem, self.batch = problem, batch
        self.x, self.y = pt.detach(x), pt.detach(y)
        self.mode = hvp_mode
        self.hvp_count = 0
        self.mixed_count = 0
        self._graph: Optional[Tuple[Tree, list]] = None

    def _grad_y(self, x: Tree, y: Tree) -> Tree:
        return grad(self.problem.g, argnums=1)(x, y, self.batch)

    # ∂²_yy g · v
    def hvp(self, v: Tree) -> Tree:
        self.hvp_count += 1
        mode = self.mode
        if mode == "auto" and self.problem._hvp_fallback:
            mode = "reverse-over-reverse"
        if mode in ("auto", "forward-over-reverse"):
            try:
                return jvp(lambda y_: self._grad_y(self.x, y_), (self.y,), (v,))[1]
            except (RuntimeError, NotImplementedError) as err:
                if mode != "auto" or "forward" not in str(err).lower() and "jvp" not in str(err).lower():
                    raise
                self.problem._hvp_fallback = True
        return self._hvp_double_backward(v)

    def _hvp_double_backward(self, v: Tree) -> Tree:
        if self._graph is None:
            y_req = {k: t.detach().requires_grad_(True) for k, t in self.y.items()}
            with torch.enable_grad():
                gy = torch.autograd.grad(self.problem.g(self.x, y_req, self.batch),
                                         list(y_req.values()), create_graph=True)
            self._graph = (y_req, list(gy))
        y_req, gy = self._graph
        with torch.enable_grad():
            out = torch.autograd.grad(gy, list(y_req.values()), grad_outputs=[v[k] for k in y_req],
                                      retain_graph=True, allow_unused=True)
        return {k: (o if o is not None else torch.zeros_like(v[k])).detach()
                for k, o in zip(y_req, out)}

    # ∂²_xy g · v  (a dict like x)
    def mixed(self, v: Tree) -> Tree:
        self.mixed_count += 1
        _, pullback = vjp(lambda x_: self._grad_y(x_, self.y), self.x)
        return pullback(v)[0]
