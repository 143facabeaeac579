"""``train(cfg)``: data → splits → model + adapters → :class:`Trainer` → adapter, summary, plots.

Output directory layout::

    <output_dir>/config.json        the resolved TrainConfig
    <output_dir>/labels.json        class names in index order (label values mapped to 0..K-1), counts
    <output_dir>/metrics.jsonl      one JSON object per logged iteration / evaluation
    <output_dir>/checkpoint/        exact, verified resume point (see debora.train.checkpoint)
    <output_dir>/adapter/           debora.save_pretrained (reload with debora.from_pretrained)
    <output_dir>/peft/              PEFT LoRA export (if export_peft)
    <output_dir>/summary.md|json    the summary table
    <output_dir>/*.png              ranks, s trajectories, FW gap, train/eval curves
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

import debora

from . import checkpoint as ckpt
from . import distributed as distmod
from . import summary as summary_mod
from .config import TrainConfig
from .data import Examples, image_examples, load_raw, resolve_task, tokenize
from . import outdir
from . import resume as resume_checks
from .labels import check_classes
from .loop import NonFiniteError, Trainer, TrainState, _maybe_float, nonfinite_parameters
from .metrics import MetricsWriter
from .models import (default_modules_to_save, default_targets, load_image_model, load_text_model)
from .split import make_splits


@dataclass
class TrainResult:
    summary: Dict[str, Any]
    model: Any
    state: TrainState
    trainer: Trainer
    output_dir: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a valid torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for but CUDA is not available; use --device cpu "
                         "or auto")
    return dev


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def prepare(cfg: TrainConfig, device: torch.device):
    """``(model, task, d1, d2, eval, splits, info)``: everything the Trainer needs, adapters injected."""
    task = resolve_task(cfg)
    if task == "image" and cfg.preset is None and cfg.basis != "euclidean" and (cfg.init_s or 0.0) < 1.0:
        warnings.warn("an image task at the text default's magnitudes (s held at 0.1, or Frank-Wolfe on small s): "
                      "on Fashion-MNIST they measured 8 points below TrainConfig.from_preset('oblique-svd', ...) "
                      "(s held at 1), which `debora train` uses for images (docs/rank_selection.md, rounds "
                      "11-12)", UserWarning, stacklevel=3)
    if cfg.dropout > 0:
        raise ValueError(f"dropout={cfg.dropout}: adapter dropout is not implemented (the paper uses "
                         "none); set dropout to 0")
    raw = load_raw(cfg)
    if len(raw) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} has no labelled examples")
    splits = make_splits(raw.labels, cfg.seed, cfg.split, cfg.eval_fraction, cfg.max_examples,
                         eval_labels=None if raw.eval is None else raw.eval.labels,
                         max_eval_examples=cfg.max_eval_examples)
    pool = raw.subset(splits.pool)
    ev_raw = (raw.eval if splits.eval_from_source else raw).subset(splits.eval)
    num_labels = len(raw.label_names)
    if int(raw.labels.max()) >= num_labels or int(raw.labels.min()) < 0:   # sources map their labels
        raise ValueError(f"dataset {cfg.dataset!r}: class indices outside 0..{num_labels - 1}")
    check_classes(raw.labels[splits.pool], raw.label_names, cfg.dataset)
    torch.manual_seed(cfg.seed)   # the head's initialisation
    if task == "text":
        tokenizer, model, model_name = load_text_model(cfg.model, num_labels)
        pool_ex = tokenize(pool, tokenizer, cfg.max_length)
        eval_ex = tokenize(ev_raw, tokenizer, cfg.max_length)
    else:
        tokenizer = None
        model, model_name = load_image_model(cfg.model, num_labels)
        pool_ex, eval_ex = image_examples(pool), image_examples(ev_raw)
    d1 = _take(pool_ex, splits.d1)
    d2 = d1 if cfg.split == "same" else _take(pool_ex, splits.d2)
    targets = cfg.target_modules if cfg.target_modules else default_targets(model, task)
    to_save = cfg.modules_to_save if cfg.modules_to_save else default_modules_to_save(model, task)
    dcfg = debora.DeboraConfig(target_modules=targets, init_rank=cfg.init_rank, alpha=cfg.alpha,
                               tau=cfg.tau, eps=cfg.eps, budget=cfg.budget, basis=cfg.basis,
                               modules_to_save=to_save, init_seed=cfg.seed,
                               init_s=cfg.init_s, init_bases=cfg.init_bases)
    if hasattr(getattr(model, "config", None), "id2label"):   # class names travel with the model
        model.config.id2label = {i: n for i, n in enumerate(raw.label_names)}
        model.config.label2id = {n: i for i, n in enumerate(raw.label_names)}
    debora.inject(model, dcfg)
    model.to(device)
    counts = np.bincount(np.asarray(raw.labels[splits.pool], dtype=np.int64), minlength=num_labels)
    info = {"task": task, "model": model_name, "tokenizer": tokenizer, "label_names": raw.label_names,
            "label_counts": {n: int(c) for n, c in zip(raw.label_names, counts)},
            "dropped_empty": int(raw.dropped_empty),
            "splits": splits.sizes(), "debora_config": dcfg.to_dict()}
    return model, task, d1, d2, eval_ex, splits, info


def _take(ex: Examples, idx) -> Examples:
    idx = np.asarray(idx, dtype=np.int64)
    lab = ex.labels[torch.as_tensor(idx)]
    if ex.images is not None:
        return Examples(labels=lab, images=ex.images[torch.as_tensor(idx)], meta=ex.meta)
    return Examples(labels=lab, features=[ex.features[i] for i in idx.tolist()], meta=ex.meta)


def train(cfg: TrainConfig, *, estimator=None, fw_solver=None, callback=None,
          progress: Optional[bool] = None) -> TrainResult:
    """Run dEBORA training as configured; returns the summary, the trained model and the final state.

    Nothing is written to ``output_dir`` until set-up has succeeded: the directory is checked first
    (:mod:`~debora.train.outdir`: not a file, writable, empty unless resumed or overwritten), then a
    checkpoint to resume is verified (:mod:`~debora.train.checkpoint`) and its config compared
    (:mod:`~debora.train.resume`), then data, model and trainer are built and the checkpoint state is
    loaded; only then are ``config.json`` and ``metrics.jsonl`` written."""
    t_start = time.perf_counter()
    dist = distmod.setup(cfg.device)          # None: one process (a plain `debora train`)
    device = dist.device if dist is not None else resolve_device(cfg.device)
    world = dist.world_size if dist is not None else 1
    main = dist is None or dist.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = os.path.abspath(cfg.output_dir)
    ckpt_path = os.path.join(out, "checkpoint")
    resume_from = None
    if cfg.resume:
        resume_from = ckpt_path if cfg.resume == "auto" else cfg.resume
        if ckpt.resolve(resume_from) is None:
            if cfg.resume != "auto":
                raise ValueError(f"--resume {cfg.resume!r}: no checkpoint there (expected a directory "
                                 "written by `debora train`)")
            resume_from = None
    outdir.check(out, resume=bool(cfg.resume), overwrite=cfg.overwrite,
                 no_checkpoint=cfg.resume == "auto" and resume_from is None)
    loaded, changed, world_changed = None, [], False
    if resume_from is not None:
        loaded = ckpt.load(resume_from)
        where = os.path.join(resume_from, "state.json")
        saved_cfg = loaded[1].get("config")
        saved_world = (loaded[1].get("world_size", 1),
                       (saved_cfg if isinstance(saved_cfg, dict) else {}).get("batch_size", cfg.batch_size))
        world_changed = resume_checks.check_world_size(*saved_world, world, cfg.batch_size, where)
        changed = resume_checks.check_config(saved_cfg, cfg, where, world_changed=world_changed)
        if world_changed:
            changed.append(f"world_size: checkpoint {saved_world[0]}, now {world}")
    model, task, d1, d2, eval_ex, splits, info = prepare(cfg, device)
    if world_changed:
        resume_checks.check_world_size(*saved_world, world, cfg.batch_size, where,
                                       has_dropout=_has_dropout(model))
    trainer = Trainer(model, cfg, task, d1, d2, eval_ex, device, estimator=estimator, fw_solver=fw_solver,
                      metrics=None, callback=callback, dist=dist)
    trainer.label_names = list(info["label_names"])
    state = None
    if loaded is not None:
        state = trainer.load_checkpoint(resume_from, loaded=loaded)
    if dist is not None:   # every rank has checked the directory and loaded its state: rank 0 writes
        dist.barrier()
    if not main:
        return _train_other_rank(trainer, state, ckpt_path, model, cfg, info, task, device, out, t_start)
    # set-up succeeded: from here on the output directory is written
    outdir.claim(out, overwrite=cfg.overwrite and loaded is None)
    _write_json(os.path.join(out, "config.json"), cfg.to_dict())
    _write_json(os.path.join(out, "labels.json"), {"names": list(info["label_names"]),
                                                   "train_counts": info["label_counts"],
                                                   "dropped_empty_texts": info["dropped_empty"]})
    metrics_path = os.path.join(out, "metrics.jsonl")
    metrics = MetricsWriter(metrics_path, resume_iteration=None if state is None else state.iteration)
    trainer.metrics = metrics
    try:
        if state is not None:
            metrics.write("resume", iteration=state.iteration, checkpoint=resume_from, changed=changed)
        else:
            metrics.write("start", iteration=0, config=cfg.to_dict(), splits=info["splits"],
                          model=info["model"], total_iterations=trainer.total_iterations,
                          device=str(device), world_size=world, global_batch=trainer.global_batch,
                          labels=info["label_counts"],
                          dropped_empty_texts=info["dropped_empty"])
        state = trainer.train(state, checkpoint_path=ckpt_path,
                              progress=cfg.progress if progress is None else progress)
        # artefacts
        adapter_dir = os.path.join(out, "adapter")
        bad = nonfinite_parameters(model)
        if bad:   # the loop checks after every iteration; this guards callers' own states
            raise NonFiniteError(f"refusing to save the adapter: {len(bad)} parameter tensors hold NaN/Inf "
                                 f"(e.g. {bad[:3]})")
        if hasattr(debora, "save_pretrained"):
            debora.save_pretrained(model, adapter_dir)
        else:  # pragma: no cover - while debora.io is missing
            warnings.warn("debora.save_pretrained is not available: adapter not saved")
        if cfg.export_peft:
            debora.export_peft(model, os.path.join(out, "peft"))
        summary = _summary(trainer, state, model, cfg, info, task, device, out, t_start)
        metrics.write("end", iteration=state.iteration, **{k: v for k, v in summary.items()
                                                           if k not in ("ranks_start", "ranks_end")})
    finally:
        metrics.close()
    summary["table"] = summary_mod.write(summary, out)
    if cfg.plots:
        from .plots import make_plots
        summary["plots"] = make_plots(metrics_path, out)
    return TrainResult(summary=summary, model=model, state=state, trainer=trainer, output_dir=out)


def _has_dropout(model) -> bool:
    """Whether a module of ``model`` draws dropout masks (p > 0) in training mode."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _train_other_rank(trainer, state, ckpt_path, model, cfg, info, task, device, out, t_start):
    """Ranks other than 0: the same training (their collectives pair with rank 0's), nothing written."""
    state = trainer.train(state, checkpoint_path=ckpt_path, progress=False)
    summary = _summary(trainer, state, model, cfg, info, task, device, out, t_start)
    summary["table"] = summary_mod.render(summary)
    return TrainResult(summary=summary, model=model, state=state, trainer=trainer, output_dir=out)


def _summary(trainer, state, model, cfg, info, task, device, out, t_start) -> Dict[str, Any]:
    hist = state.history
    counts = trainer.counts()
    summary = {
        "model": info["model"], "dataset": cfg.dataset, "task": task, "splits": info["splits"],
        "iterations": state.iteration, "estimator": trainer.estimator_name, "fw": cfg.fw,
        "fw_step": cfg.fw_step, "budget": cfg.budget, "basis": cfg.basis, "tau": cfg.tau,
        "eps": cfg.eps, "init_rank": cfg.init_rank, "preset": cfg.preset,
        "target_rank": cfg.target_rank if cfg.target_params is None else None,
        "target_params": cfg.target_params, "layers": len(debora.adapter_layers(model)),
        "eval_acc_start": hist.get("eval_start", {}).get("eval_acc"),
        "eval_loss_start": hist.get("eval_start", {}).get("eval_loss", float("nan")),
        "eval_acc_end": hist.get("eval_end", {}).get("eval_acc"),
        "eval_loss_end": hist.get("eval_end", {}).get("eval_loss", float("nan")),
        "eval_acc_best": hist.get("eval_best", {}).get("eval_acc"),
        "trainable_start": hist.get("counts_start", {}).get("trainable"),
        "trainable_end": counts["trainable"],
        "adapter_start": hist.get("counts_start", {}).get("adapter"), "adapter_end": counts["adapter"],
        "lower_params_end": counts["lower"],
        "ranks_start": hist.get("ranks_start"), "ranks_end": debora.rank_pattern(model),
        "rank_start": sum((hist.get("ranks_start") or {}).values()),
        "rank_end": sum(debora.rank_pattern(model).values()),
        "fw_gap_end": _maybe_float(state.last_gap), "nonfinite_skipped": state.skipped_lower + state.skipped_upper,
        "wall_time_s": time.perf_counter() - t_start, "train_time_s": state.elapsed,
        "device": str(device), "output_dir": out,
        "labels": info["label_counts"], "dropped_empty_texts": info["dropped_empty"],
        "world_size": trainer.world_size, "batch_size": cfg.batch_size,
        "global_batch": trainer.global_batch,
    }
    return summary
