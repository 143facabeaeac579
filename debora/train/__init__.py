"""dEBORA training: the paper's Algorithm 1 on top of :mod:`bilevel` and the adapters.

    from debora.train import TrainConfig, train
    result = train(TrainConfig.from_preset("default", output_dir="runs/x"))
    result.summary["eval_acc_end"]

Modules: ``config`` (TrainConfig, presets, YAML/JSON), ``data`` (sources, tokenisation, batches),
``split`` (eval split, D1/D2, resumable sampler), ``models`` (task models, loss), ``fwsetup`` (s vector
↔ layers, feasible set, FW solver), ``loop`` (Trainer, TrainState), ``checkpoint`` (atomic, manifest with
SHA-256 per file, no pickle, allow-listed state types), ``resume`` (what resuming checks), ``outdir``
(output directory rules), ``labels`` (label values → classes), ``files`` (data file checks),
``config_checks`` (field coercion and ranges), ``metrics`` (JSONL), ``plots``, ``summary``, ``run``
(train end to end).
"""
from .config import PRESETS, TrainConfig, load_config, load_config_file

__all__ = ["TrainConfig", "PRESETS", "load_config", "load_config_file", "train", "Trainer", "TrainState",
           "TrainResult"]


def __getattr__(name):  # lazy: importing the config does not import torch-heavy modules
    if name in ("train", "TrainResult"):
        from . import run
        return getattr(run, name)
    if name in ("Trainer", "TrainState"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(name)
