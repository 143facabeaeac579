"""dEBORA: low-rank adapters with explicit rank weights s, chosen by a bilevel optimiser.

Public API (contract)::

    cfg = DeboraConfig(target_modules=[...], init_rank=8, alpha=32, tau=16, eps=1e-3,
                       budget="per_layer"|"global", basis="euclidean"|"oblique"|"stiefel",
                       modules_to_save=["classifier"])
    inject(model, cfg) -> model                  # adapters in place, everything else frozen
    adapter_layers(model) -> {name: layer}
    upper_parameters(model) -> {"<layer>.s": Parameter}           (requires_grad=False)
    lower_parameters(model) -> {"<layer>.U"/"V"/"A".."D": Parameter, saved-module params}
    rank_pattern(model) -> {name: rank}
    print_trainable_parameters(model) -> counts
    project_gradients(model); retract(model); manifold_step(model, optimizer)
    truncate(model, atol=1e-6, *, eps=None, min_rank=0, optimizer=None) -> {name: Truncation(kept, removed)}
    merge_and_unload(model) -> model
    save_pretrained(model, path); from_pretrained(base_model, path) -> model
    export_peft(model, path) -> info
    bilevel_problem(model, loss_fn, lower_loss_fn=None, *, inputs_fn=None, label_keys=...) -> (problem, x, y)

``import debora`` registers the estimator ``"debora-closed-form"`` in :mod:`bilevel.estimators`.
"""
from bilevel import estimators as _estimators

from .closed_form import DeboraClosedForm
from .config import DeboraConfig
from .inject import (get_config, inject, lower_parameters, print_trainable_parameters, rank_pattern,
                     upper_parameters, basis_parameters)
from .layers import AdapterLayer, CPConv2dAdapter, MatrixAdapter, adapter_layers
from .manifolds import manifold_step, project_gradients, retract
from .merge import merge_and_unload
from .problem import bilevel_problem
from .refactor import refold_magnitudes_, singular_values, svd_refactor
from .truncation import Truncation, truncate

_estimators.register(DeboraClosedForm.name, DeboraClosedForm)

__all__ = ["DeboraConfig", "inject", "upper_parameters", "lower_parameters", "basis_parameters",
           "truncate", "Truncation", "rank_pattern", "merge_and_unload", "bilevel_problem",
           "print_trainable_parameters", "project_gradients", "retract", "manifold_step",
           "adapter_layers", "get_config", "AdapterLayer", "MatrixAdapter", "CPConv2dAdapter",
           "DeboraClosedForm"]

from .io import from_pretrained, read_adapter, save_pretrained  # noqa: E402
from .peft_export import export_peft  # noqa: E402

__all__ += ["save_pretrained", "from_pretrained", "read_adapter", "export_peft", "singular_values", "svd_refactor", "refold_magnitudes_"]
