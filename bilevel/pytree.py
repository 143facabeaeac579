"""Arithmetic on parameter pytrees: ``dict[str, Tensor]`` with matching keys and shapes.

Every linear solver and estimator in :mod:`bilevel` works on these dicts directly, so that a model's
parameters never have to be flattened into one vector (which would copy them) except where a dense
method asks for it explicitly (:func:`flatten` / :func:`unflatten`).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch

Tree = Dict[str, torch.Tensor]


def check_tree(tree: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise a clear ``TypeError`` unless ``tree`` is a non-empty ``dict[str, Tensor]``."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name} must be a dict[str, Tensor], got {type(tree).__name__}; "
                        f"wrap a single tensor as {{'{name}': tensor}}")
    if len(tree) == 0:
        raise ValueError(f"{name} is an empty dict; it needs at least one tensor")
    for k, v in tree.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")


def check_same_structure(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                         name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming the first key or shape that differs between two pytrees."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"pytrees {name_a} and {name_b} have different keys: only in {name_a}: "
                         f"{only_a}, only in {name_b}: {only_b}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{name_a}[{k!r}] has shape {tuple(a[k].shape)} but {name_b}[{k!r}] "
                             f"has shape {tuple(b[k].shape)}")


def signature(tree: Mapping[str, torch.Tensor]) -> tuple:
    """Hashable structure of a pytree: ``((key, shape, dtype, device), ...)`` (no data, no sync)."""
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in tree.items())


def map_(fn: Callable[..., torch.Tensor], *trees: Mapping[str, torch.Tensor]) -> Tree:
    first = trees[0]
    return {k: fn(*(t[k] for t in trees)) for k in first}


def _vals(tree: Mapping[str, torch.Tensor], keys) -> list:
    return [tree[k] for k in keys]


def add(a: Tree, b: Tree) -> Tree:
    keys = list(a)
    return dict(zip(keys, torch._foreach_add(_vals(a, keys), _vals(b, keys))))


def sub(a: Tree, b: Tree) -> Tree:
    keys = list(a)
    return dict(zip(keys, torch._foreach_sub(_vals(a, keys), _vals(b, keys))))


def scale(alpha, a: Tree) -> Tree:
    """``alpha * a``; ``alpha`` a Python number or a 0-dim tensor (kept on device: no host sync)."""
    keys = list(a)
    return dict(zip(keys, torch._foreach_mul(_vals(a, keys), alpha)))


def axpy(alpha, x: Tree, y: Tree, sign: float = 1.0) -> Tree:
    """``y + sign · alpha · x`` in one kernel per leaf (``addcmul``; ``alpha`` a number or a 0-dim
    tensor kept on the device, so no host sync)."""
    keys = list(y)
    if len(keys) == 1:
        (k,) = keys
        if isinstance(alpha, (int, float)):
            return {k: torch.add(y[k], x[k], alpha=sign * alpha)}
        return {k: torch.addcmul(y[k], x[k], alpha, value=sign)}
    if isinstance(alpha, (int, float)):
        return dict(zip(keys, torch._foreach_add(_vals(y, keys), _vals(x, keys), alpha=sign * alpha)))
    scaled = torch._foreach_mul(_vals(x, keys), alpha if sign == 1.0 else sign * alpha)
    return dict(zip(keys, torch._foreach_add(_vals(y, keys), scaled)))


def dot(a: Tree, b: Tree) -> torch.Tensor:
    """Inner product ``Σ_k <a_k, b_k>`` as a 0-dim tensor (no host sync)."""
    terms = [torch.vdot(a[k].reshape(-1), b[k].reshape(-1)) for k in a]
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def norm(a: Tree) -> torch.Tensor:
    return torch.sqrt(dot(a, a))


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def numel(a: Tree) -> int:
    return sum(v.numel() for v in a.values())


def flatten(a: Tree, like: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Concatenate all leaves into one vector, in the key order of ``like`` (default: ``a``'s own).

    Leaves are matched by key, never by position: ``flatten(matvec(v), like=b)`` is laid out like
    ``flatten(b)`` whatever order ``matvec`` lists its keys in."""
    keys = a if like is None else like
    return torch.cat([a[k].reshape(-1) for k in keys])


def reorder(a: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> Tree:
    """``a`` with its keys in the order of ``like`` (for APIs that compare pytree structure by
    insertion order, such as ``torch.func.jvp``); no copy of the tensors."""
    return {k: a[k] for k in like}


def check_dtypes(trees: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.dtype:
    """Raise ``TypeError`` unless every leaf of every tree has one floating dtype; return it.

    ``trees`` maps a name (``"x"``, ``"y"``) to a pytree. The message names the leaves of each dtype
    and the cast that fixes it."""
    by_dtype: Dict[torch.dtype, list] = {}
    for name, tree in trees.items():
        for k, v in tree.items():
            by_dtype.setdefault(v.dtype, []).append(f"{name}[{k!r}]")
    for dt, leaves in by_dtype.items():
        if not (dt.is_floating_point or dt.is_complex):
            raise TypeError(f"{', '.join(leaves[:4])} has dtype {dt}, which cannot be differentiated; "
                            "pass floating-point tensors (e.g. t.to(torch.float32))")
    if len(by_dtype) > 1:
        detail = "; ".join(f"{dt}: {', '.join(leaves[:4])}{' …' if len(leaves) > 4 else ''}"
                           for dt, leaves in by_dtype.items())
        widest = max(by_dtype, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 128)
        raise TypeError(f"the leaves of {' and '.join(trees)} mix dtypes ({detail}); every tensor of "
                        f"the problem must share one dtype: cast them, e.g. "
                        f"{{k: v.to({widest}) for k, v in tree.items()}}")
    return next(iter(by_dtype))


def unflatten(vec: torch.Tensor, like: Tree) -> Tree:
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i:i + n].reshape(v.shape)
        i += n
    return out
