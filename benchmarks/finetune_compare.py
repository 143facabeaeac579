"""Accuracy against trainable parameters: dEBORA vs PEFT LoRA (fixed ranks) vs PEFT AdaLoRA, offline.

    # the issue's full grid (3 tasks x 3 seeds, 2,400 examples x 3 epochs); resumable
    .venv/bin/python benchmarks/finetune_compare.py --json benchmarks/results/fronts.json
    # what README's table used (see there for the exact command)
    .venv/bin/python benchmarks/finetune_compare.py --tasks rotten-tomatoes,tweets --examples 1600 \
        --epochs 2 --seeds 3 --json benchmarks/results/fronts.json

Methods (``--methods``): ``debora`` (one run per dEBORA setting: ``--target-ranks``, ``--target-params``
(budgets in adapter parameters), ``--taus`` and/or ``--init-ranks`` (fixed r0, no count budget), or the
default preset once if none is given), ``lora-rN`` for any N (PEFT LoRA, rank N on every
targeted layer), ``adalora`` (PEFT AdaLoRA, init_r = ``--adalora-init-r``, one run per target average
rank in ``--adalora-target-rs``). Tasks (``--tasks``): packaged names (rotten-tomatoes, tweets,
amazon, nyt, fashion-mnist) or local CSV/JSON paths (``--text-column``/``--label-column`` if the
columns are not guessed).

Fairness: every run of a task and seed uses the same stratified training pool and held-out split
(the trainer's), the same epochs over the pool, batch size, max length, AdamW (weight decay 1e-3),
α = 32 and no dropout. dEBORA's default trains its bases and its rank weights on the whole pool (D1 =
D2, the hypergradient fused into the lower backward pass), so one epoch costs it the same number of
forward/backward passes as LoRA's (``--preset paper``: halves D1/D2, an extra pass on D1).
Learning rates: each method's lr comes from the same protocol, ``--lr-grid``: on a tuning split
(seeds ``--tune-seeds``: other random pools and held-out splits than the reported seeds) each method
is run at its middle setting for every lr of the grid on the first task; the best held-out accuracy,
averaged over the tuning seeds, picks the lr used for all of that method's settings, tasks and seeds
(a race: an lr more than ``--tune-race`` points below the first seed's best, e.g. one that diverged, is
not repeated on the other seeds and cannot be picked). ``--lr`` instead fixes one lr for all.

Output: ``--json`` (a list, one record per finished run: task, method, setting, seed, acc, params,
adapter_params, wall, lr, rank, ...; runs already in the file are skipped, so a killed campaign
resumes), a markdown table (``--out``), and one PNG per task of held-out accuracy against final
trainable parameters (mean ± std over seeds) with each method's front (``--plot-dir``).

Verdicts against issue 9's criteria (LoRA r=8's accuracy within its seed std at ≤ ⅓ of its adapter
parameters; dominance of the LoRA/AdaLoRA points; ≥ AdaLoRA, read off dEBORA's front at AdaLoRA's size:
its most accurate point with no more parameters; wall time over LoRA r=8's) are printed first with every method at its tuned lr (the lr its tuning records chose on this
task, else on the task it was tuned on; a variant such as ``--debora-label "svd-cut, s held"`` is tuned
apart), then at every lr that LoRA r=8 and dEBORA share, as a secondary view.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from debora.train.lr_schedule import SCHEDULES  # noqa: E402  (after the offline settings)

DEFAULT_METHODS = "debora,lora-r1,lora-r2,lora-r4,lora-r8,adalora"


def _peak_memory_mb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _task_config(spec, **extra):
    from debora.train import TrainConfig
    kw = dict(dataset=spec["task"], max_examples=spec["examples"], seed=spec["seed"],
              max_length=spec["max_length"], max_eval_examples=spec["eval_examples"],
              text_column=spec.get("text_column"), label_column=spec.get("label_column"),
              image_size=spec.get("image_size", 32))
    kw.update(extra)
    return kw


def run_debora(spec) -> dict:
    import torch
    import debora
    from debora.train import TrainConfig, train
    from debora.train.batchnorm import batchnorm_layers
    overrides = _task_config(spec, epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"],
                             output_dir=spec["output_dir"], progress=False, plots=False, eval_every=0,
                             threads=spec.get("threads"), device=spec["device"], overwrite=True,
                             lr_schedule=spec.get("lr_schedule", "constant"), warmup=spec.get("warmup", 0.0))
    overrides["recalibrate_bn"] = spec.get("recalibrate_bn", True)
    overrides.update(spec.get("debora", {}))
    overrides.update(spec.get("setting_overrides", {}))
    cfg = TrainConfig.from_preset(spec.get("preset", "default"), **overrides)
    res = train(cfg)
    bn = len(batchnorm_layers(res.model))
    s = res.summary
    wall = s["train_time_s"]     # the training loop with its evaluations at start and end (as PEFT's)
    head = s["trainable_end"] - s["adapter_end"]
    return {"acc": s["eval_acc_end"], "acc_start": s["eval_acc_start"], "params": s["trainable_end"],
            "adapter_params": s["adapter_end"], "head_params": head, "params_start": s["trainable_start"],
            "rank": s["rank_end"], "rank_start": s["rank_start"], "wall": wall,
            "mem": _peak_memory_mb(torch.device(s["device"])), "bn_stats": _bn_stats(cfg.recalibrate_bn, bn),
            "ranks": {k: int(v) for k, v in debora.rank_pattern(res.model).items()}}   # final rank per layer


def _bn_stats(recalibrate: bool, layers: int) -> str:
    """How the evaluated model's BatchNorm statistics were obtained: "none" (no BatchNorm layer),
    "recalibrated" (recomputed on the training pool before each evaluation) or "running" (as training
    left them)."""
    return "none" if not layers else ("recalibrated" if recalibrate else "running")


def _adalora_kept(model, pattern) -> tuple:
    """(adapter parameters kept by AdaLoRA's final mask, total kept rank): r(in + out + 1) per layer."""
    import numpy as np
    adapter, rank = 0, 0
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_E") and "default" in getattr(mod, "lora_E", {}):
            a, b = mod.lora_A["default"], mod.lora_B["default"]
            kept = None
            for key, mask in (pattern or {}).items():   # keys: "<module>.lora_E.default"
                if name.endswith(key.split(".lora_E")[0].replace("base_model.model.", "")):
                    kept = int(np.sum(mask))
                    break
            if kept is None:
                kept = a.shape[0]
            adapter += kept * (a.shape[1] + b.shape[0] + 1)
            rank += kept
    return adapter, rank


def run_peft(spec, on_trained=None) -> dict:
    """PEFT LoRA / AdaLoRA on the same pool and held-out split, same optimizer, batch and epochs.
    ``on_trained(model, evaluate)`` (optional) is called after training, before the final evaluation
    (``benchmarks/truncation_probe.py`` uses it to cut a trained LoRA)."""
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from debora.train import TrainConfig
    from debora.train.data import collate, image_examples, load_raw, resolve_task, to_device, tokenize
    from debora.train.models import default_modules_to_save, default_targets, load_image_model, \
        load_text_model
    from debora.train.batchnorm import batchnorm_layers, recalibrate_batchnorm
    from debora.train.lr_schedule import lr_factor
    from debora.train.run import resolve_device
    from debora.train.split import Sampler, make_splits

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = TrainConfig(**_task_config(spec))
    device = resolve_device(spec["device"])
    task = resolve_task(cfg)
    raw = load_raw(cfg)
    splits = make_splits(raw.labels, cfg.seed, "halves", cfg.eval_fraction, cfg.max_examples,
                         eval_labels=None if raw.eval is None else raw.eval.labels,
                         max_eval_examples=cfg.max_eval_examples)
    num_labels = max(len(raw.label_names), int(raw.labels.max()) + 1)
    torch.manual_seed(cfg.seed)
    ev_raw = (raw.eval if splits.eval_from_source else raw).subset(splits.eval)
    if task == "text":
        tok, model, _ = load_text_model(None, num_labels)
        pool = tokenize(raw.subset(splits.pool), tok, cfg.max_length)
        ev = tokenize(ev_raw, tok, cfg.max_length)
        task_type = "SEQ_CLS"
    else:
        model, _ = load_image_model(None, num_labels)
        pool, ev = image_examples(raw.subset(splits.pool)), image_examples(ev_raw)
        task_type = None
    targets = default_targets(model, task)
    to_save = default_modules_to_save(model, task)
    if task == "image":
        # PEFT builds lora_A/lora_B with the target's own class; EfficientNet's static-"same"-padding
        # Conv2d subclass cannot be built without an image size. The targets (default_targets) are plain
        # Conv2d or 1×1 stride-1 ones, whose padding is the identity: present them to PEFT as nn.Conv2d
        # (the same output, checked below).
        named = dict(model.named_modules())
        probe = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model.eval()(probe)
            for name in targets:
                if type(named[name]) is not torch.nn.Conv2d:
                    named[name].__class__ = torch.nn.Conv2d
            torch.testing.assert_close(model(probe), ref)
    steps_per_epoch = math.ceil(len(pool) / spec["batch_size"])
    total = max(1, math.ceil(spec["epochs"] * steps_per_epoch))
    method = spec["method"]
    common = dict(lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    if task_type is None:
        common["modules_to_save"] = to_save
    else:
        common["task_type"] = task_type
    if method.startswith("lora-r"):
        pcfg = LoraConfig(r=int(method[len("lora-r"):]), **common)
    elif method == "adalora":
        if task != "text":
            raise ValueError("PEFT's AdaLoRA supports Linear/Conv1D layers only, not the Conv2d layers "
                             "of the image model")
        # PEFT's schedule: budget warm-up tinit, cubic decrease, final fine-tuning tfinal steps (the
        # AdaLoRA paper's GLUE settings use ~10% warm-up and ~30% final phase); deltaT as in its docs
        pcfg = AdaLoraConfig(init_r=spec["adalora_init_r"], target_r=spec["setting_value"],
                             tinit=int(0.1 * total), tfinal=int(0.3 * total), deltaT=max(1, total // 50),
                             beta1=0.85, beta2=0.85, orth_reg_weight=0.1, total_step=total, **common)
    else:
        raise ValueError(f"unknown PEFT method {method!r}")
    model = get_peft_model(model, pcfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=1e-3)
    sampler = Sampler(len(pool), spec["batch_size"], cfg.seed, stream=2)
    image_size = cfg.image_size

    def batch_of(ex, idx):
        return to_device(collate(ex, idx, image_size), device)

    def logits(b):
        if task == "text":
            return model(**{k: v for k, v in b.items() if k != "labels"}).logits
        return model(b["pixel_values"])

    recalibrate = spec.get("recalibrate_bn", True)

    @torch.no_grad()
    def evaluate():
        if recalibrate:   # as dEBORA's trainer does (debora.train.batchnorm): statistics of the pool
            recalibrate_batchnorm(model, (batch_of(pool, range(i, min(len(pool), i + 128)))
                                          for i in range(0, len(pool), 128)), lambda m, b: logits(b))
        model.eval()
        correct = 0
        for i in range(0, len(ev), 128):
            b = batch_of(ev, range(i, min(len(ev), i + 128)))
            correct += int((logits(b).argmax(-1) == b["labels"]).sum())
        model.train()
        return correct / len(ev)

    t0 = time.perf_counter()     # like dEBORA's train_time_s: evaluation at start and end + training
    acc_start = evaluate()
    model.train()
    schedule, warmup = spec.get("lr_schedule", "constant"), spec.get("warmup", 0.0)
    for step in range(total):
        for group in opt.param_groups:      # the same schedule as dEBORA's lower level (lr_schedule.py)
            group["lr"] = spec["lr"] * lr_factor(schedule, step, total, warmup)
        b = batch_of(pool, sampler.next())
        if task == "text":
            out = model(**b)        # labels in the batch: AdaLoRA adds its orthogonality regulariser
            loss = out.loss
        else:
            loss = torch.nn.functional.cross_entropy(logits(b), b["labels"])
        loss.backward()
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
    if on_trained is not None:
        on_trained(model, evaluate)
    acc = evaluate()
    wall = time.perf_counter() - t0
    trainable_now = sum(p.numel() for p in params)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    head = trainable_now - lora
    if method == "adalora":
        adapter, rank = _adalora_kept(model, model.peft_config["default"].rank_pattern)
    else:
        adapter, rank = lora, int(method[len("lora-r"):]) * len(targets)
    return {"acc": acc, "acc_start": acc_start, "params": adapter + head, "adapter_params": adapter,
            "head_params": head, "params_start": trainable_now, "rank": rank, "wall": wall,
            "mem": _peak_memory_mb(device), "bn_stats": _bn_stats(recalibrate, len(batchnorm_layers(model)))}


def worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    res = run_debora(spec) if spec["method"] == "debora" else run_peft(spec)
    print("RESULT " + json.dumps(res), flush=True)


# -- campaign -----------------------------------------------------------------------------------------
def settings_of(method: str, args):
    """[(setting label, value, dEBORA overrides)] for one method."""
    if method == "debora":
        tag = f" {args.debora_label}" if args.debora_label else ""
        out = [(f"target_rank={r:g}{tag}", r, {"target_rank": r}) for r in args.target_ranks]
        out += [(f"target_params={p}{tag}", p, {"target_params": p, "target_rank": None})
                for p in args.target_params]
        out += [(f"tau={t:g}{tag}", t, {"tau": t}) for t in args.taus]
        out += [(f"init_rank={r}{tag}", r, {"init_rank": r, "target_rank": None}) for r in args.init_ranks]
        return out or [(f"preset{tag}", None, {})]
    if method == "adalora":
        return [(f"target_r={r}", r, {}) for r in args.adalora_target_rs]
    if method.startswith("lora-r"):
        int(method[len("lora-r"):])   # validates
        return [(f"r={method[len('lora-r'):]}", int(method[len("lora-r"):]), {})]
    raise SystemExit(f"unknown method {method!r}: use debora, lora-rN (any N) or adalora")


def _key(rec):
    return (rec["task"], rec["method"], rec["setting"], rec["seed"], rec.get("phase", "report"),
            float(rec["lr"]), bool(rec.get("recalibrate_bn", True)), schedule_of(rec))


def schedule_of(rec) -> str:
    """A record's lr schedule, e.g. "constant" (records from before the option) or "linear, warmup 0.1"."""
    name, warm = rec.get("lr_schedule", "constant"), float(rec.get("warmup", 0.0))
    return name + (f", warmup {warm:g}" if warm else "")


def _load(paths):
    out = []
    for path in paths:
        if path and os.path.isfile(path):
            with open(path) as fh:
                out.extend(json.load(fh))
    return out


def family(method: str) -> str:
    """Methods that share one tuned lr: every ``lora-rN`` is ``lora``."""
    return "lora" if method.startswith("lora-r") else method


def _save(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(records, fh, indent=1)
    os.replace(tmp, path)


def _run(spec, records, path, written):
    key = _key(dict(spec, setting=spec["setting"]))
    for r in records:
        if _key(r) == key:
            return r
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    tag = f"[{spec['task']} {spec['method']} {spec['setting']} seed {spec['seed']} lr {spec['lr']:g}]"
    if proc.returncode != 0 or not line:
        print(f"{tag} FAILED:\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    res = json.loads(line[-1][len("RESULT "):])
    rec = {"task": spec["task"], "method": spec["method"], "setting": spec["setting"], "seed": spec["seed"],
           "phase": spec.get("phase", "report"), "lr": spec["lr"], "examples": spec["examples"],
           "epochs": spec["epochs"], "recalibrate_bn": spec.get("recalibrate_bn", True),
           "lr_schedule": spec.get("lr_schedule", "constant"), "warmup": spec.get("warmup", 0.0), **res}
    records.append(rec)
    written.append(rec)
    if path:
        _save(path, written)
    print(f"{tag} acc {100 * rec['acc']:.2f}% params {rec['params']:,} adapter {rec['adapter_params']:,} "
          f"wall {rec['wall']:.0f}s", file=sys.stderr, flush=True)
    return rec


def _fmt(values, pct=False, digits=1):
    if not values:
        return "n/a"
    scale = 100.0 if pct else 1.0
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:,.{digits}f} ± {s:,.{digits}f}"


def groups(records, task):
    """{(method, setting): records} of the reported runs; a setting run at several lrs is split into
    one group per lr (its label then names the lr), never averaged across lrs."""
    rep = [r for r in records if r["task"] == task and r.get("phase", "report") == "report"]
    lrs = {}
    for r in rep:
        lrs.setdefault((r["method"], r["setting"]), set()).add(float(r["lr"]))
    out = {}
    for r in rep:
        label = r["setting"]
        if len(lrs[(r["method"], label)]) > 1:
            label = f"{label}, lr {float(r['lr']):g}"
        out.setdefault((r["method"], label), []).append(r)
    return out


def plot_fronts(records, tasks, plot_dir):
    """One PNG per task: held-out accuracy against final trainable parameters, one line per family
    (and variant) and lr; solid lines at the family's tuned lr (``tuned_groups``), faded dashed lines
    at any other lr."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    os.makedirs(plot_dir, exist_ok=True)
    for task in tasks:
        rep = [r for r in records if r["task"] == task and r.get("phase", "report") == "report"]
        if not rep:
            continue
        _, chosen = tuned_groups(records, task)
        lines = {}
        for r in rep:
            fam = (family(r["method"]), variant(r["setting"]))
            lines.setdefault((fam, float(r["lr"])), {}).setdefault((r["method"], r["setting"]), []).append(r)
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        for ((fam, var), lr), g in sorted(lines.items()):
            tuned = chosen.get((fam, var), (None,))[0] == lr
            pts = sorted((_mean(rs, "params"), 100 * _mean(rs, "acc"),
                          100 * statistics.stdev([r["acc"] for r in rs]) if len(rs) > 1 else 0.0,
                          setting.split(" ")[0].split("=")[-1]) for (_, setting), rs in g.items())
            name = f"{fam}{' ' + var if var else ''}, lr {lr:g}" + ("" if tuned else " (not its tuned lr)")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=name, linestyle="-" if tuned else "--", alpha=1.0 if tuned else 0.35)
            for p in pts:
                ax.annotate(p[3], (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            alpha=1.0 if tuned else 0.5)
        ax.set_xscale("log")
        ax.set_xlabel("final trainable parameters (adapter + head)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{os.path.basename(task)}: mean ± std over seeds (solid: each method at its tuned lr)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
        fig.tight_layout()
        path = os.path.join(plot_dir, f"front_{os.path.splitext(os.path.basename(task))[0]}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def table(records, tasks):
    lines = ["| task | method | setting | lr | held-out acc (%) | final trainable params | adapter params | "
             "wall (s) | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for (method, setting), rs in sorted(groups(records, task).items(),
                                            key=lambda kv: statistics.mean(r["params"] for r in kv[1])):
            lines.append(f"| {os.path.basename(task)} | {method} | {setting} | {rs[0]['lr']:g} | "
                         f"{_fmt([r['acc'] for r in rs], pct=True, digits=2)} | "
                         f"{_fmt([r['params'] for r in rs], digits=0)} | "
                         f"{_fmt([r['adapter_params'] for r in rs], digits=0)} | "
                         f"{_fmt([r['wall'] for r in rs], digits=0)} | {len(rs)} |")
    return "\n".join(lines)


def variant(setting: str) -> str:
    """A setting label's variant: what follows its ``name=value`` ("target_rank=2 svd-cut, s held" →
    "svd-cut, s held"; "r=8" → ""). Variants of one method are tuned and compared apart."""
    return setting.partition(" ")[2]


def _tune_accs(records, keep):
    """{lr: {seed: acc}} of the tuning records (phase "tune") that ``keep`` accepts."""
    by_lr = {}
    for r in records:
        if r.get("phase") == "tune" and keep(r):
            by_lr.setdefault(float(r["lr"]), {})[r["seed"]] = r["acc"]
    return by_lr


def _tune_key(r):
    return (r["task"], family(r["method"]), variant(r["setting"]))


def tuned_lrs(records):
    """{(task, family, variant): lr} chosen by the tuning records (phase "tune"): the best mean held-out
    accuracy over the tuning seeds, ties to the smaller lr, as the campaign's protocol chooses it.

    Only an lr run on every tuning seed that the family has records for is eligible (the race in
    ``main`` stops repeating an lr that is far behind on the first seed; it cannot win on one lucky
    seed), and the eligible lrs are compared on the same seeds. With one tuning seed this is the single
    best record."""
    groups = {}
    for r in records:
        if r.get("phase") == "tune":
            groups.setdefault(_tune_key(r), []).append(r)
    picks = {}
    for key, group in groups.items():
        by_lr = _tune_accs(group, lambda r: True)
        seeds = set().union(*by_lr.values())
        score = {lr: statistics.mean(by_seed.values()) for lr, by_seed in by_lr.items() if set(by_seed) == seeds}
        if score:           # no lr ran on every seed of the family (disjoint manual runs): no pick
            picks[key] = max(score, key=lambda lr: (score[lr], -lr))
    return picks


def tuning_scores(records, task, fam, var=""):
    """{lr: (mean acc, seeds)} of one family's tuning records on ``task`` (the numbers ``tuned_lrs``
    chose from; an lr with fewer seeds than the others was stopped by the race), for logs and README."""
    by_lr = _tune_accs(records, lambda r: _tune_key(r) == (task, fam, var))
    return {lr: (statistics.mean(s.values()), sorted(s)) for lr, s in sorted(by_lr.items())}


def tuned_groups(records, task):
    """({(method, setting): records} at each family's tuned lr, {(family, variant): (lr, how)}).

    The lr of a family (and variant) is the one its tuning records chose on this task, else on the
    one other task it was tuned on (the protocol tunes on the first task and reuses the lr); a family
    never tuned counts only where it ran at a single lr ("untuned")."""
    picks = tuned_lrs(records)
    rep = [r for r in records if r["task"] == task and r.get("phase", "report") == "report"]
    chosen, out = {}, {}
    for key in sorted({(family(r["method"]), variant(r["setting"])) for r in rep}):
        here = picks.get((task,) + key)
        other = {lr for (t, *k), lr in picks.items() if tuple(k) == key and t != task}
        lrs = {float(r["lr"]) for r in rep if (family(r["method"]), variant(r["setting"])) == key}
        if here is not None:
            chosen[key] = (here, "tuned here")
        elif len(other) == 1:
            chosen[key] = (other.pop(), "tuned on another task")
        elif len(lrs) == 1:
            chosen[key] = (next(iter(lrs)), "untuned")
    for r in rep:
        key = (family(r["method"]), variant(r["setting"]))
        if key in chosen and float(r["lr"]) == chosen[key][0]:
            out.setdefault((r["method"], r["setting"]), []).append(r)
    return out, chosen


def _mean(rs, field):
    return statistics.mean(r[field] for r in rs)


def front_at(deb, params):
    """dEBORA's front at a rival's size: ``((method, setting), records)`` of the most accurate dEBORA
    group with no more mean trainable parameters than ``params``, and how it was picked; if every
    dEBORA group is larger, the one nearest in size ("nearest size, larger")."""
    within = {k: v for k, v in deb.items() if _mean(v, "params") <= params}
    if within:
        return max(within.items(), key=lambda kv: (_mean(kv[1], "acc"), -_mean(kv[1], "params"))), \
            "best with no more params"
    return min(deb.items(), key=lambda kv: abs(_mean(kv[1], "params") - params)), "nearest size, larger"


def paired_by_seed(deb_records, rival_records):
    """dEBORA minus the rival in held-out accuracy (points), seed by seed over the seeds both ran:
    ``(seeds, diffs, mean, (lo, hi))`` with the two-sided 95% Student-t interval of the mean difference
    (``None`` with fewer than two shared seeds). Pairing removes what a seed does to both (its data
    draw, its held-out split), which the two groups' separate stds do not."""
    from scipy import stats
    a = {r["seed"]: 100 * r["acc"] for r in deb_records}
    b = {r["seed"]: 100 * r["acc"] for r in rival_records}
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return seeds, diffs, None, None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return seeds, diffs, mean, None
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return seeds, diffs, mean, (mean - half, mean + half)


def paired_verdict(ci, subject: str = "dEBORA") -> str:
    """What a paired interval says: "not separated" (no interval, or it contains 0), or the subject
    above / below."""
    return ("not separated" if ci is None or ci[0] <= 0 <= ci[1]
            else f"{subject} above" if ci[0] > 0 else f"{subject} below")


def _paired_lines(deb, rivals):
    out = []
    for (m, s), rs in sorted(rivals.items()):
        (dk, drs), how = front_at(deb, _mean(rs, "params"))
        seeds, diffs, mean, ci = paired_by_seed(drs, rs)
        if mean is None:
            continue
        verdict = paired_verdict(ci)
        out.append(f"  - paired by seed vs {m} {s} ({len(seeds)} seeds): dEBORA {dk[1]} ({how}) "
                   f"{mean:+.2f} points (per seed {' / '.join(f'{d:+.2f}' for d in diffs)}"
                   + (f"; 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + f") → {verdict}")
    return out


def _dominated(deb, rivals):
    """The rival (LoRA/AdaLoRA) points with a dEBORA point of no more parameters and no lower accuracy."""
    dpts = [(_mean(rs, "params"), _mean(rs, "acc")) for rs in deb.values()]
    return [f"{m} {s}" for (m, s), rs in sorted(rivals.items())
            if any(p <= _mean(rs, "params") and a >= _mean(rs, "acc") for p, a in dpts)]


def _verdict_lines(g, task, where, default_variant=None):
    """The issue's criteria on one set of groups (every group at one lr). Criterion 1 and dominance take
    the best of every dEBORA setting present; with ``default_variant`` (the variant labels, a string or a
    list of them, of the rows that ran the current default preset) a second dominance line counts those
    rows alone."""
    lora8 = g.get(("lora-r8", "r=8"))
    deb = {k: v for k, v in g.items() if k[0] == "debora"}
    if not lora8 or not deb:
        return []
    name = os.path.basename(task)
    m8, a8 = _mean(lora8, "acc"), _mean(lora8, "adapter_params")
    sd8 = statistics.stdev([r["acc"] for r in lora8]) if len(lora8) > 1 else 0.0
    best = None
    for (_, setting), rs in deb.items():
        acc, ap = _mean(rs, "acc"), _mean(rs, "adapter_params")
        if acc >= m8 - sd8 and ap <= a8 / 3 and (best is None or ap < best[2]):
            best = (setting, acc, ap, len(rs))
    out = []
    if best:
        out.append(f"- {name} ({where}): dEBORA {best[0]} reaches {100 * best[1]:.2f}% over {best[3]} seeds "
                   f"(LoRA r=8: {100 * m8:.2f} ± {100 * sd8:.2f}% over {len(lora8)}) with {best[2]:,.0f} "
                   f"adapter parameters = {best[2] / a8:.2f}× LoRA r=8's: criterion 1 MET.")
    else:
        out.append(f"- {name} ({where}): no dEBORA setting matches LoRA r=8 ({100 * m8:.2f} ± "
                   f"{100 * sd8:.2f}%) at ≤ ⅓ of its {a8:,.0f} adapter parameters: criterion 1 NOT met.")
    # dominance: every competitor point needs a dEBORA point with no more parameters and no lower accuracy
    rivals = {k: v for k, v in g.items() if k[0] != "debora"}
    beaten = _dominated(deb, rivals)
    out.append(f"  - dominance: {len(beaten)} of {len(rivals)} LoRA/AdaLoRA points have a dEBORA point (any of "
               f"{len(deb)} settings) with no more parameters and no lower mean accuracy"
               + (f" ({', '.join(beaten)})" if beaten else ""))
    if default_variant:
        labels = [default_variant] if isinstance(default_variant, str) else list(default_variant)
        own = {k: v for k, v in deb.items() if variant(k[1]) in labels}
        mine = _dominated(own, rivals)
        out.append(f"  - dominance by the default alone ({' / '.join(repr(v) for v in labels)} rows: "
                   f"{', '.join(sorted(k[1] for k in own)) or 'none'}): {len(mine)} of {len(rivals)}"
                   + (f" ({', '.join(mine)})" if mine else ""))
    out += _paired_lines(deb, rivals)
    for (_, setting), rs in sorted({k: v for k, v in rivals.items() if k[0] == "adalora"}.items()):
        ap, aa = _mean(rs, "params"), _mean(rs, "acc")
        (ds, drs), how = front_at(deb, ap)
        dp, da = _mean(drs, "params"), _mean(drs, "acc")
        out.append(f"  - vs AdaLoRA {setting} ({100 * aa:.2f}% at {ap:,.0f} params): dEBORA {ds[1]} "
                   f"{100 * da:.2f}% at {dp:,.0f} ({dp / ap:.2f}×, {how}) → {'≥' if da >= aa else '<'} AdaLoRA")
    w8 = _mean(lora8, "wall")
    walls = ", ".join(f"{s} {_mean(rs, 'wall') / w8:.2f}×" for (_, s), rs in sorted(deb.items()))
    out.append(f"  - wall time / LoRA r=8's ({w8:.0f} s; runs on a shared 2-core machine): {walls}")
    return out


def verdicts(records, tasks, default_variant=None):
    """The issue's criteria per task: at each family's tuned lr (the protocol), then at every lr that
    LoRA r=8 and dEBORA share (a secondary view, labelled with that lr)."""
    out = []
    for task in tasks:
        g, chosen = tuned_groups(records, task)
        lines = _verdict_lines(g, task, "each method at its tuned lr", default_variant)
        if lines:
            lines[0] += " lrs: " + "; ".join(
                f"{fam}{' ' + var if var else ''} {lr:g} ({how})" for (fam, var), (lr, how) in sorted(chosen.items()))
        out += lines
        rep = [r for r in records if r["task"] == task and r.get("phase", "report") == "report"]
        shared = sorted({float(r["lr"]) for r in rep if r["method"] == "lora-r8"}
                        & {float(r["lr"]) for r in rep if r["method"] == "debora"})
        for lr in shared:
            if all(lr == c[0] for c in chosen.values()):
                continue                      # the same view as above
            g_lr = {}
            for r in rep:
                if float(r["lr"]) == lr:
                    g_lr.setdefault((r["method"], r["setting"]), []).append(r)
            out += _verdict_lines(g_lr, task, f"every method at lr {lr:g}", default_variant)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rotten-tomatoes,tweets,fashion-mnist",
                    help="comma-separated packaged task names or local CSV/JSON paths")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="debora, lora-rN (any N), adalora")
    ap.add_argument("--target-ranks", default="1,2,4", help="dEBORA settings: final average rank per adapter")
    ap.add_argument("--target-params", default="", help="dEBORA settings: budgets in adapter parameters "
                    "(target_params; e.g. a LoRA rank's size), optional")
    ap.add_argument("--taus", default="", help="dEBORA settings: τ values (paper's budget), optional")
    ap.add_argument("--init-ranks", default="", help="dEBORA settings: fixed ranks r0 without a count "
                    "budget (target_rank None; with --preset fixed-oblique: no selection at all), optional")
    ap.add_argument("--adalora-target-rs", default="1,2,4")
    ap.add_argument("--adalora-init-r", type=int, default=8)
    ap.add_argument("--examples", type=int, default=2400, help="training pool size per task")
    ap.add_argument("--eval-examples", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (instead of --seeds), "
                                                      "e.g. to spread a campaign over processes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--text-column")
    ap.add_argument("--label-column")
    ap.add_argument("--lr", type=float, default=None, help="one lr for every method (skips the tuning)")
    ap.add_argument("--lr-grid", default="5e-4,1e-3,3e-3", help="lrs tried per method on the tuning split")
    ap.add_argument("--tune-seeds", "--tune-seed", dest="tune_seeds", default="100",
                    help="comma-separated tuning seeds; each lr is scored by its mean held-out accuracy "
                         "over them (e.g. 100,101,102: the noise of one seed can exceed the lrs' effect)")
    ap.add_argument("--tune-race", type=float, default=10.0,
                    help="points of held-out accuracy: an lr this far below the best on the first tuning "
                         "seed is not run on the others (diverged lrs), and cannot be picked")
    ap.add_argument("--lr-schedule", default="constant", choices=SCHEDULES,
                    help="every method's lr schedule (debora.train.lr_schedule): the lr decays to 0 over "
                         "the run; records keep it, and a report shows only the records of this schedule")
    ap.add_argument("--warmup", type=float, default=0.0, help="every method's linear lr warm-up, a "
                                                               "fraction of the run")
    ap.add_argument("--preset", default="default", help="dEBORA preset")
    ap.add_argument("--debora", default="{}", help="JSON dict of extra dEBORA TrainConfig overrides")
    ap.add_argument("--debora-label", default="",
                    help="appended to dEBORA's setting labels (a variant given by --debora), so that its "
                         "records and table rows stay apart from the default's")
    ap.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
                    help="evaluate every method with BatchNorm's running statistics as training left them "
                         "(default: recomputed on the training pool before each evaluation, for every "
                         "method; no effect on models without BatchNorm)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/fronts.json",
                    help="records file (written); more comma-separated files are read too (e.g. the "
                         "parts of a campaign run as several processes)")
    ap.add_argument("--phase", default="all", choices=("all", "tune", "report"),
                    help="tune: only the lr protocol; report: only the reported runs (lrs from the "
                         "tuning records in --json files)")
    ap.add_argument("--out", default="benchmarks/results/fronts.md")
    ap.add_argument("--plot-dir", default="benchmarks/results")
    ap.add_argument("--report-only", action="store_true", help="table and plots from --json, no runs")
    ap.add_argument("--default-variant", action="append", default=None,
                    help="variant label of the dEBORA rows that ran the current default preset (e.g. "
                         "'svd cut at s 0.1, sigma2/param, refold total'); repeat it for several labels "
                         "(the default with a user budget knob): the verdict adds a dominance line "
                         "counting those rows alone")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    args.target_ranks = [float(v) for v in args.target_ranks.split(",") if v]
    args.taus = [float(v) for v in args.taus.split(",") if v]
    args.target_params = [int(v) for v in args.target_params.split(",") if v]
    args.init_ranks = [int(v) for v in args.init_ranks.split(",") if v]
    args.adalora_target_rs = [int(v) for v in args.adalora_target_rs.split(",") if v]
    tune_seeds = [int(v) for v in args.tune_seeds.split(",") if v]
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    json_files = [p for p in args.json.split(",") if p]
    for p in (json_files[0], args.out):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    written = _load(json_files[:1])
    here = schedule_of({"lr_schedule": args.lr_schedule, "warmup": args.warmup})
    records = [r for r in _load(json_files) if schedule_of(r) == here]   # one schedule per report
    runs_dir = os.path.join(os.path.dirname(os.path.abspath(json_files[0])), "runs")
    base = dict(examples=args.examples, eval_examples=args.eval_examples, epochs=args.epochs,
                batch_size=args.batch_size, max_length=args.max_length, image_size=args.image_size,
                text_column=args.text_column, label_column=args.label_column,
                adalora_init_r=args.adalora_init_r, preset=args.preset, debora=json.loads(args.debora),
                device=args.device, threads=args.threads, recalibrate_bn=args.recalibrate_bn,
                lr_schedule=args.lr_schedule, warmup=args.warmup)

    def spec(task, method, setting, seed, lr, phase):
        label, value, overrides = setting
        sched = "" if here == "constant" else "-" + here.replace(", warmup ", "-w")
        out = os.path.join(runs_dir, f"{os.path.basename(task)}-{method}-{label}-{seed}-{phase}-{lr:g}{sched}")
        return dict(base, task=task, method=method, setting=label, setting_value=value,
                    setting_overrides=overrides, seed=seed, lr=lr, phase=phase, output_dir=out)

    lrs = {}
    if not args.report_only:
        grid = [args.lr] if args.lr is not None else [float(v) for v in args.lr_grid.split(",") if v]
        # the tuning protocol, the same for every method family: its middle setting (lora: the middle
        # requested rank), every lr of the grid, on the first task and the tuning seed
        fams = {}
        for method in methods:
            fams.setdefault(family(method), []).append(method)
        for fam, members in fams.items():
            if len(grid) == 1:
                lrs[fam] = grid[0]
                continue
            method = members[len(members) // 2]
            sets = settings_of(method, args)
            mid = sets[len(sets) // 2]
            # a race over the tuning seeds: every lr runs on the first seed; an lr more than
            # --tune-race points below that seed's best is not repeated (and cannot be picked)
            first = {}

            def in_race(lr):              # within --tune-race points of the first seed's best
                return lr in first and 100 * (max(first.values()) - first[lr]) <= args.tune_race + 1e-9

            for i, tseed in enumerate(tune_seeds):
                for lr in grid:
                    if i and not in_race(lr):
                        continue
                    s = spec(tasks[0], method, mid, tseed, lr, "tune")
                    rec = (_run(s, records, json_files[0], written) if args.phase in ("all", "tune") else
                           next((r for r in records if _key(r) == _key(s)), None))
                    if rec is not None and not i:
                        first[lr] = rec["acc"]
            by_lr = _tune_accs(records, lambda r: (r["task"], r["method"], r["setting"]) == (tasks[0], method, mid[0])
                               and r["seed"] in tune_seeds)   # records: this schedule's only
            raced = {lr for lr in grid if in_race(lr)}
            complete = len(first) == len(grid) and all(set(by_lr.get(lr, {})) >= set(tune_seeds) for lr in raced)
            scores = [(statistics.mean(by_lr[lr][t] for t in tune_seeds), -lr, lr) for lr in sorted(raced)] if complete else []
            if args.phase == "tune":
                continue
            if not scores:
                raise SystemExit(f"lr tuning of {fam} is incomplete (grid {grid}, tuning seeds {tune_seeds}, "
                                 f"records in {json_files}); run --phase tune first")
            lrs[fam] = max(scores)[2]
            print(f"[tune] {fam}: lr {lrs[fam]:g} (grid {grid}, on {tasks[0]} seeds {tune_seeds}, "
                  f"{method} {mid[0]}; mean accuracies {dict((lr, round(100 * a, 2)) for a, _, lr in scores)}; "
                  f"stopped after seed {tune_seeds[0]}: {sorted(set(grid) - raced)})",
                  file=sys.stderr, flush=True)
        if args.phase in ("all", "report"):
            seeds = ([int(v) for v in args.seed_list.split(",")] if args.seed_list else range(args.seeds))
            for seed in seeds:                # seed-major: a partial campaign still covers every method
                for task in tasks:
                    for method in methods:
                        for setting in settings_of(method, args):
                            if method == "adalora" and task == "fashion-mnist":
                                continue      # PEFT's AdaLoRA has no Conv2d support
                            _run(spec(task, method, setting, seed, lrs[family(method)], "report"), records,
                                 json_files[0], written)
    text = (f"lr schedule of every run below: {here}\n\n" + table(records, tasks) + "\n\n"
            + "\n".join(verdicts(records, tasks, args.default_variant)) + "\n")
    plots = plot_fronts(records, tasks, args.plot_dir)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)
    print("plots: " + ", ".join(plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
