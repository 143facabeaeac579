"""Implicit differentiation inside autograd: :func:`custom_root` (the jaxopt / torchopt decorator).

    def optimality_fn(y, x, *rest):          # F(y, x) = 0 at the solution, e.g. ∂_y g(x, y)
        ...
    @bilevel.custom_root(optimality_fn, argnums=1, solve=bilevel.linear_solvers.get("cg", tol=1e-10))
    def solver(y0, x, *rest):                # any solver; runs without a graph
        ...
        return y_star
    y_star = solver(y0, x)                   # a node of the autograd graph
    upper_loss(x, y_star).backward()         # x.grad: the implicit hypergradient

``argnums`` has torchopt's meaning: indices into ``solver(y0, *args)``'s signature, ``y0`` being 0
(so ``argnums=1`` is the first argument after ``y0``; ``0`` is not allowed). ``y`` and every argument in
``argnums`` may be a tensor (also 0-dim) or a ``dict[str, Tensor]``; ``optimality_fn(y, *args)`` must
return a residual with the structure of ``y``.

By the implicit function theorem, with ``A = ∂_y F(y*, x)`` and ``B = ∂_x F(y*, x)``, ``dy*/dx = −A⁻¹B``,
so the vector-Jacobian product that ``.backward()`` needs is ``x̄ = −Bᵀu`` with ``Aᵀu = ȳ``. ``Aᵀu`` is one
backward through a cached graph of F (reverse-over-reverse: one forward of F per backward call, then one
backward per product), and the solve is any :mod:`bilevel.linear_solvers` solver:

* ``solve="cg"`` (default; ``A`` symmetric positive definite, as for ``F = ∂_y g`` with g strongly convex),
  ``"dense"`` (``symmetric=False`` for a general ``F``), ``"neumann"``, ``"fixed-point"``; or
  ``bilevel.linear_solvers.get(name, damping=λ, **options)``; or any callable ``solve(matvec, b)``
  returning ``v`` or ``(v, info)`` on dicts (torchopt-style solvers see the same ``matvec``).

The products run with autocast disabled (in the dtype of y). ``wrapped.last_info`` holds the
:class:`~bilevel.linear_solvers.SolveInfo` of the latest backward (diagnostics; not state).
Differentiating twice (``create_graph=True`` through the solution) is not supported.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple, Union

import torch

from . import linear_solvers as ls
from . import pytree as pt
from .problem import second_order_mode

TreeLike = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _flatten(obj: Any, what: str) -> Tuple[Dict[str, torch.Tensor], Callable]:
    """A tensor or a dict of tensors as a dict (``{"": t}`` for a tensor) and the inverse map."""
    if isinstance(obj, torch.Tensor):
        return {"": obj}, lambda d: d[""]
    if isinstance(obj, Mapping):
        pt.check_tree(obj, what)
        keys = list(obj)
        return dict(obj), lambda d: {k: d[k] for k in keys}
    raise TypeError(f"{what} must be a torch.Tensor or a dict[str, Tensor], got {type(obj).__name__}")


def _as_solve(solve) -> Callable:
    if solve is None or isinstance(solve, str):
        return ls.get(solve or "cg")
    if not callable(solve):
        raise TypeError(f"solve must be a linear-solver name ({', '.join(ls.SOLVE_NAMES)}), "
                        f"bilevel.linear_solvers.get(...), or a callable solve(matvec, b); got "
                        f"{type(solve).__name__}")
    return solve


def custom_root(optimality_fn: Callable, argnums: Union[int, Sequence[int]] = 1, solve=None,
                has_aux: bool = False) -> Callable[[Callable], Callable]:
    """Decorate ``solver(y0, *args) -> y*`` so that ``y*`` carries the implicit gradient to
    ``args[i - 1]`` for every ``i`` in ``argnums`` (see the module docstring)."""
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be a callable F(y, *args), got {type(optimality_fn).__name__}")
    nums = (argnums,) if isinstance(argnums, int) and not isinstance(argnums, bool) else tuple(argnums)
    if not nums or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in nums):
        raise ValueError(f"argnums={argnums!r}: give indices >= 1 into solver(y0, *args) (0 is y0, the "
                         "initial guess, which the solution does not depend on), e.g. argnums=1")
    nums = tuple(sorted(set(nums)))
    solve_fn = _as_solve(solve)

    def decorator(solver: Callable) -> Callable:
        @functools.wraps(solver)
        def wrapped(y0, *args, **kwargs):
            if nums[-1] > len(args):
                raise ValueError(f"argnums={nums} refers to argument {nums[-1]} of solver(y0, *args), "
                                 f"but only {len(args)} argument(s) follow y0")
            with torch.no_grad():
                out = solver(y0, *args, **kwargs)
            y_star, aux = out if has_aux else (out, None)
            y_dict, y_unflat = _flatten(y_star, "the solver's output y*")
            y_dict = {k: v.detach() for k, v in y_dict.items()}
            arg_dicts = []
            for i in nums:
                d, unflat = _flatten(args[i - 1], f"argument {i} of the solver (argnums)")
                arg_dicts.append((i, list(d), unflat))
            flat_args = [args[i - 1][k] if keys != [""] else args[i - 1]
                         for i, keys, _ in arg_dicts for k in keys]
            meta = _Meta(optimality_fn, solve_fn, args, kwargs, y_dict, arg_dicts, wrapped)
            meta.y_is_tensor = isinstance(y_star, torch.Tensor)
            outs = _ImplicitRoot.apply(meta, *flat_args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            y_out = y_unflat(dict(zip(y_dict, outs)))
            return (y_out, aux) if has_aux else y_out

        wrapped.last_info = None
        return wrapped
    return decorator


class _Meta:
    def __init__(self, optimality_fn, solve, args, kwargs, y, arg_dicts, owner):
        self.optimality_fn, self.solve, self.args, self.kwargs = optimality_fn, solve, args, kwargs
        self.y, self.arg_dicts, self.owner = y, arg_dicts, owner


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta: _Meta, *flat_args):
        ctx.meta = meta
        ctx.save_for_backward(*flat_args)
        outs = tuple(v.detach() for v in meta.y.values())   # aliases, no copy
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grad_outs):
        meta: _Meta = ctx.meta
        flat_args = ctx.saved_tensors
        keys = list(meta.y)
        ybar = {k: (g if g is not None else torch.zeros_like(meta.y[k])) for k, g in zip(keys, grad_outs)}
        with torch.enable_grad(), second_order_mode():
            y_req = {k: v.detach().requires_grad_(True) for k, v in meta.y.items()}
            a_req = [a.detach().requires_grad_(a.is_floating_point() or a.is_complex()) for a in flat_args]
            args = list(meta.args)
            pos = 0
            for i, akeys, unflat in meta.arg_dicts:
                args[i - 1] = unflat(dict(zip(akeys, a_req[pos:pos + len(akeys)])))
                pos += len(akeys)
            y_arg = y_req[""] if meta.y_is_tensor else dict(y_req)
            F = meta.optimality_fn(y_arg, *args, **meta.kwargs)
            F_dict, _ = _flatten(F, "optimality_fn(y, *args)")
            try:
                pt.check_same_structure(F_dict, y_req, "optimality_fn(y, *args)", "y")
            except ValueError as err:
                raise ValueError(f"{err}: the optimality residual must have the structure of y "
                                 "(e.g. F = ∂_y g)") from None
            F_leaves = [F_dict[k] for k in keys]
            y_leaves = [y_req[k] for k in keys]

            def matvec(u):          # Aᵀ u, A = ∂_y F
                out = torch.autograd.grad(F_leaves, y_leaves, grad_outputs=[u[k] for k in keys],
                                      retain_graph=True, allow_unused=True)
                return {k: (o if o is not None else torch.zeros_like(y_req[k])).detach()
                        for k, o in zip(keys, out)}
            res = meta.solve(matvec, ybar)
            u, info = res if isinstance(res, tuple) else (res, None)
            if not isinstance(u, Mapping):
                raise TypeError(f"solve(matvec, b) must return a dict like b (or (dict, info)), got "
                                f"{type(u).__name__}")
            diff = [a for a in a_req if a.requires_grad]
            grads = torch.autograd.grad(F_leaves, diff, grad_outputs=[u[k] for k in keys],
                                        allow_unused=True) if diff else []
        meta.owner.last_info = info
        it = iter(grads)
        out = []
        for a in a_req:
            g = next(it) if a.requires_grad else None
            out.append(None if g is None else -g.detach())
        return (None, *out)
