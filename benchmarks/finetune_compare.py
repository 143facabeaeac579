"""dEBORA vs PEFT LoRA (r=2, r=8) vs PEFT AdaLoRA on packaged text tasks (MiniLM, offline).

    .venv/bin/python benchmarks/finetune_compare.py                      # full: 2,400 examples, 3 epochs, 3 seeds
    .venv/bin/python benchmarks/finetune_compare.py --examples 600 --epochs 2 --seeds 2   # reduced

Every run uses the same data (the trainer's stratified held-out split and training pool for the seed),
the same epochs over the training pool, batch size, max length, and the same lower-level optimizer
(AdamW, learning rate, weight decay 1e-3, α = 32). dEBORA trains its bases on D2 and chooses ranks on
D1 (equal halves of the pool, or D1 = D2 with --split same); LoRA/AdaLoRA train on the whole pool.

Reported per method and task, mean ± std over seeds: held-out accuracy, final trainable parameters
(dEBORA: bases + s + head after truncation; LoRA: A, B + head; AdaLoRA: the ranks its final mask keeps,
r(in + out + 1) per layer, + head — PEFT masks instead of removing them, so the tensors stay allocated),
wall time, and peak memory (peak RSS of the run's own process on CPU; peak CUDA memory on GPU).
Each run is a separate subprocess so that peak memory is its own. Output: one markdown table on
stdout (and in --out).
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

METHODS = ("debora", "lora-r2", "lora-r8", "adalora")


def _peak_memory_mb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_debora(spec) -> dict:
    import torch
    from debora.train import TrainConfig, train
    overrides = dict(dataset=spec["task"], max_examples=spec["examples"], epochs=spec["epochs"],
                     seed=spec["seed"], batch_size=spec["batch_size"], lr=spec["lr"],
                     max_length=spec["max_length"], max_eval_examples=spec["eval_examples"],
                     output_dir=spec["output_dir"], progress=False, plots=False, eval_every=0,
                     threads=spec.get("threads"), device=spec["device"], overwrite=True)
    overrides.update(spec.get("debora", {}))
    cfg = TrainConfig.from_preset(spec.get("preset", "default"), **overrides)
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    s = res.summary
    return {"acc": s["eval_acc_end"], "acc_start": s["eval_acc_start"], "params": s["trainable_end"],
            "params_start": s["trainable_start"], "rank": s["rank_end"], "wall": wall,
            "mem": _peak_memory_mb(torch.device(s["device"]))}


def run_peft(spec) -> dict:
    """LoRA / AdaLoRA with PEFT on the same pool and eval split, same optimizer and epochs."""
    import numpy as np
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from debora.train import TrainConfig
    from debora.train.data import collate, load_raw, to_device, tokenize
    from debora.train.models import default_targets, load_text_model
    from debora.train.run import resolve_device
    from debora.train.split import Sampler, make_splits

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = TrainConfig(dataset=spec["task"], max_examples=spec["examples"], seed=spec["seed"],
                      max_length=spec["max_length"], max_eval_examples=spec["eval_examples"])
    device = resolve_device(spec["device"])
    raw = load_raw(cfg)
    splits = make_splits(raw.labels, cfg.seed, "halves", cfg.eval_fraction, cfg.max_examples,
                         eval_labels=None if raw.eval is None else raw.eval.labels,
                         max_eval_examples=cfg.max_eval_examples)
    torch.manual_seed(cfg.seed)
    tok, model, _ = load_text_model(None, len(raw.label_names))
    pool = tokenize(raw.subset(splits.pool), tok, cfg.max_length)
    ev = tokenize((raw.eval if splits.eval_from_source else raw).subset(splits.eval), tok, cfg.max_length)
    targets = default_targets(model, "text")
    steps_per_epoch = math.ceil(len(pool) / spec["batch_size"])
    total = max(1, math.ceil(spec["epochs"] * steps_per_epoch))
    method = spec["method"]
    if method.startswith("lora"):
        r = int(method.split("-r")[1])
        pcfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    else:
        pcfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=spec["adalora_init_r"], target_r=spec["adalora_target_r"],
                             lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                             tinit=int(0.1 * total), tfinal=int(0.2 * total), deltaT=max(1, total // 50),
                             total_step=total)
    model = get_peft_model(model, pcfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=1e-3)
    sampler = Sampler(len(pool), spec["batch_size"], cfg.seed, stream=2)

    @torch.no_grad()
    def evaluate():
        model.eval()
        correct = 0
        for i in range(0, len(ev), 128):
            b = to_device(collate(ev, range(i, min(len(ev), i + 128))), device)
            correct += int((model(**b).logits.argmax(-1) == b["labels"]).sum())
        model.train()
        return correct / len(ev)

    acc_start = evaluate()
    t0 = time.perf_counter()
    model.train()
    for step in range(total):
        b = to_device(collate(pool, sampler.next()), device)
        out = model(**b)            # labels in the batch: out.loss includes AdaLoRA's orthogonal regulariser
        out.loss.backward()
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
    acc = evaluate()
    wall = time.perf_counter() - t0
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    if method == "adalora":
        pattern = model.peft_config["default"].rank_pattern or {}
        adapter = 0
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_E") and "default" in getattr(mod, "lora_E", {}):
                a = mod.lora_A["default"]
                kept = None
                for key, mask in pattern.items():   # keys: "<module>.lora_E.default"
                    if name.endswith(key.split(".lora_E")[0].replace("base_model.model.", "")):
                        kept = int(np.sum(mask))
                        break
                if kept is None:
                    kept = a.shape[0]
                adapter += kept * (a.shape[1] + mod.lora_B["default"].shape[0] + 1)
        trainable = adapter + head
        rank = sum(int(np.sum(m)) for m in pattern.values()) if pattern else None
    else:
        trainable = sum(p.numel() for p in params)
        rank = int(method.split("-r")[1]) * len(targets)
    return {"acc": acc, "acc_start": acc_start, "params": trainable,
            "params_start": sum(p.numel() for p in params), "rank": rank, "wall": wall,
            "mem": _peak_memory_mb(device)}


def worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    res = run_debora(spec) if spec["method"] == "debora" else run_peft(spec)
    print("RESULT " + json.dumps(res), flush=True)


def _fmt(values, pct=False, digits=1):
    if not values:
        return "n/a"
    scale = 100.0 if pct else 1.0
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:,.{digits}f} ± {s:,.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rotten-tomatoes,tweets")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--examples", type=int, default=2400, help="training pool size per task")
    ap.add_argument("--eval-examples", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="AdamW lr for every method (default: the "
                                                             "dEBORA default preset's)")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--adalora-init-r", type=int, default=8)
    ap.add_argument("--adalora-target-r", type=int, default=4)
    ap.add_argument("--preset", default="default", help="dEBORA preset")
    ap.add_argument("--debora", default="{}", help="JSON dict of extra dEBORA TrainConfig overrides")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_out/finetune_compare.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    from debora.train.config import PRESETS
    lr = args.lr if args.lr is not None else PRESETS[args.preset].get("lr", 1e-3)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    results = {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_all = time.perf_counter()
    for task in tasks:
        for method in methods:
            for seed in range(args.seeds):
                spec = dict(task=task, method=method, seed=seed, examples=args.examples,
                            eval_examples=args.eval_examples, epochs=args.epochs, batch_size=args.batch_size,
                            lr=lr, max_length=args.max_length, adalora_init_r=args.adalora_init_r,
                            adalora_target_r=args.adalora_target_r, preset=args.preset,
                            debora=json.loads(args.debora), device=args.device, threads=args.threads,
                            output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "runs",
                                                    f"{task}-{method}-{seed}"))
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                      capture_output=True, text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(f"[{task} {method} seed {seed}] FAILED:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                res = json.loads(line[-1][len("RESULT "):])
                results.setdefault((task, method), []).append(res)
                print(f"[{task} {method} seed {seed}] acc {100 * res['acc']:.2f}% params {res['params']:,} "
                      f"wall {res['wall']:.0f}s mem {res['mem']:.0f}MB", file=sys.stderr, flush=True)
    lines = [f"Setting: MiniLM-L6 (packaged), {args.examples} training examples, {args.eval_examples} held-out, "
             f"{args.epochs:g} epochs, batch {args.batch_size}, max length {args.max_length}, AdamW lr {lr:g} "
             f"wd 1e-3, α = 32, {args.seeds} seed(s); AdaLoRA init_r={args.adalora_init_r} → "
             f"target_r={args.adalora_target_r}; dEBORA preset '{args.preset}' {args.debora}. "
             f"Total {time.perf_counter() - t_all:.0f} s.", "",
             "| task | method | held-out acc (%) | final trainable params | wall (s) | peak mem (MB) |",
             "|---|---|---|---|---|---|"]
    for task in tasks:
        for method in methods:
            rs = results.get((task, method), [])
            lines.append(f"| {task} | {method} | {_fmt([r['acc'] for r in rs], pct=True, digits=2)} | "
                         f"{_fmt([r['params'] for r in rs], digits=0)} | {_fmt([r['wall'] for r in rs], digits=0)} | "
                         f"{_fmt([r['mem'] for r in rs], digits=0)} |")
    verdicts = []
    for task in tasks:
        d, a = results.get((task, "debora")), results.get((task, "adalora"))
        if d and a:
            da, aa = statistics.mean(r["acc"] for r in d), statistics.mean(r["acc"] for r in a)
            dp, ap_ = statistics.mean(r["params"] for r in d), statistics.mean(r["params"] for r in a)
            ok = da >= aa and dp <= 0.5 * ap_
            verdicts.append(f"- {task}: dEBORA {100 * da:.2f}% at {dp:,.0f} params vs AdaLoRA {100 * aa:.2f}% at "
                            f"{ap_:,.0f} params ({dp / ap_:.2f}×): aim (≥ AdaLoRA accuracy at ≤ ½ its params) "
                            f"{'MET' if ok else 'NOT met'}.")
    text = "\n".join(lines + [""] + verdicts) + "\n"
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
