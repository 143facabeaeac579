"""The adapted model as a :class:`bilevel.BilevelProblem` (x = every layer's s, y = bases + head).

    problem, x, y = debora.bilevel_problem(model, loss_fn)
    res = bilevel.estimators.get("cg")(problem, x, y, upper_batch, lower_batch)

* ``x = {"<layer>.s": …}`` and ``y = {"<layer>.U": …, …, "<saved module param>": …}`` (layers at rank 0
  are left out: their tensors are empty), both
  *detached aliases* of the live parameters (``p.detach()``: same storage, no copy, no autograd
  history). In-place updates of the model (optimizer steps, Frank-Wolfe writes into ``s``) are
  visible through them; after :func:`debora.truncate` the Parameters are new objects, so call
  ``debora.upper_parameters`` / ``lower_parameters`` (or this function) again. The problem itself stays
  valid after truncation: it only holds the model.
* Both losses run ``torch.func.functional_call(model, {**x, **y}, args, kwargs)`` and return
  ``loss_fn(output, batch)`` (``lower_loss_fn`` for the lower level if given).

Batch convention (how ``batch`` becomes the model's inputs, unless ``inputs_fn(batch) -> (args,
kwargs)`` is given):

* ``dict`` (Hugging Face style): ``model(**{k: v for k, v in batch.items() if k not in label_keys})``,
  ``label_keys`` defaulting to ``("labels", "label", "targets")``. Labels are kept away from the model
  so that ``loss_fn`` decides the loss; pass ``label_keys=()`` to let a HF model compute ``output.loss``
  and use ``loss_fn=lambda out, b: out.loss``.
* ``tuple`` / ``list`` ``(inputs, target, …)`` (vision style): ``model(batch[0])``.
* a ``Tensor``: ``model(batch)``.

``loss_fn(output, batch)`` always receives the full batch. The model's train/eval mode is used as is
(call ``model.eval()`` for deterministic losses when dropout is present).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from bilevel import BilevelProblem

from .inject import lower_parameters, upper_parameters
from .layers import adapter_layers

DEFAULT_LABEL_KEYS = ("labels", "label", "targets")


def model_inputs(batch: Any, label_keys: Sequence[str] = DEFAULT_LABEL_KEYS) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` for the model from a batch (see module doc)."""
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k not in label_keys}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty tuple batch; expected (inputs, target, ...)")
        return (batch[0],), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise TypeError(f"cannot turn a batch of type {type(batch).__name__} into model inputs; use a dict, "
                    "an (inputs, target) tuple, a tensor, or pass inputs_fn=")


class DeboraProblem(BilevelProblem):
    """A :class:`bilevel.BilevelProblem` that also knows its layers' basis manifolds.

    ``basis_kinds``: ``{"<layer>.<basis>": manifold}``; read by the closed-form estimator when it is
    asked for Riemannian basis gradients.
    """

    def __init__(self, upper_loss, lower_loss, basis_kinds: Dict[str, str]):
        super().__init__(upper_loss, lower_loss)
        self.basis_kinds = dict(basis_kinds)


def bilevel_problem(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                    lower_loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, *,
                    inputs_fn: Optional[Callable[[Any], Tuple[tuple, dict]]] = None,
                    label_keys: Sequence[str] = DEFAULT_LABEL_KEYS):
    """``(problem, x, y)`` for the adapted ``model`` (see module doc for conventions)."""
    if not adapter_layers(model):
        raise ValueError("the model has no dEBORA adapters; call debora.inject(model, cfg) first")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable (model_output, batch) -> scalar Tensor")
    label_keys = tuple(label_keys)
    to_inputs = inputs_fn if inputs_fn is not None else (lambda b: model_inputs(b, label_keys))
    lower_fn = lower_loss_fn if lower_loss_fn is not None else loss_fn

    def _run(fn, x, y, batch):
        args, kwargs = to_inputs(batch)
        out = functional_call(model, {**x, **y}, args, kwargs, strict=False)
        return fn(out, batch)

    def upper_loss(x, y, batch):
        return _run(loss_fn, x, y, batch)

    def lower_loss(x, y, batch):
        return _run(lower_fn, x, y, batch)

    from .manifolds import basis_kinds
    problem = DeboraProblem(upper_loss, lower_loss, basis_kinds(model))
    # a layer truncated to rank 0 has empty s and bases: nothing to differentiate, so they are left out
    # (functional_call(strict=False) then uses the layer's own empty tensors, and its forward is base(x))
    x = {k: v.detach() for k, v in upper_parameters(model).items() if v.numel()}
    y = {k: v.detach() for k, v in lower_parameters(model).items() if v.numel()}
    return problem, x, y
