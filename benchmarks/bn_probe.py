"""Does BatchNorm's running statistics explain the Fashion-MNIST noise? (docs/rank_selection.md, round 4)

Trains one run (PEFT LoRA via ``finetune_compare.run_peft``, or dEBORA's default preset via
``debora.train.train``) on Fashion-MNIST with EfficientNet-Lite0 (32 px, 2,400 × 3, 2,000 held out, the
comparison's protocol), then evaluates the same trained model twice: with BatchNorm's running
statistics as training left them, and after recomputing them on the training pool (BatchNorm layers
in training mode, everything else in eval mode, cumulative averages). It also records each adapted
layer's ‖ΔW‖_* (and Σ s for dEBORA: with unit-norm columns ‖ΔW‖_* ≤ scaling · Σ s ≤ scaling · (τ + rε)).
One JSON line per run is appended to ``benchmarks/results/bn_probe.jsonl`` (``OUT``).

    .venv/bin/python benchmarks/bn_probe.py lora-r8 0 1e-3 8        # method seed lr setting
    .venv/bin/python benchmarks/bn_probe.py debora 0 1e-3 2         # setting: dEBORA target_rank

This script was written before ``TrainConfig.recalibrate_bn`` existed (the trainer then evaluated with
the running statistics); it now turns that option off for the first evaluation.
"""
import json, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE)); sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import finetune_compare as fc
from debora.train.data import load_raw, image_examples, collate
from debora.train.batchnorm import recalibrate_batchnorm
from debora.train.split import make_splits
from debora.train import TrainConfig

def pool_eval(spec):
    cfg = TrainConfig(**fc._task_config(spec))
    raw = load_raw(cfg)
    sp = make_splits(raw.labels, cfg.seed, "halves", cfg.eval_fraction, cfg.max_examples,
                     eval_labels=None if raw.eval is None else raw.eval.labels,
                     max_eval_examples=cfg.max_eval_examples)
    ev_raw = (raw.eval if sp.eval_from_source else raw).subset(sp.eval)
    return image_examples(raw.subset(sp.pool)), image_examples(ev_raw)

def recalibrate(model, pool, bs=128):
    """The trainer's recalibration (debora.train.batchnorm) on the training pool."""
    recalibrate_batchnorm(model, (collate(pool, range(i, min(len(pool), i + bs)), 32)
                                  for i in range(0, len(pool), bs)), lambda m, b: m(b["pixel_values"]))
    model.eval()


@torch.no_grad()
def acc(model, ev):
    model.eval(); c = 0
    for i in range(0, len(ev), 256):
        b = collate(ev, range(i, min(len(ev), i + 256)), 32)
        out = model(b["pixel_values"]); out = getattr(out, "logits", out)
        c += int((out.argmax(-1) == b["labels"]).sum())
    return c / len(ev)

@torch.no_grad()
def nuc_norms(model):
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            A = m.lora_A["default"].weight.flatten(1); B = m.lora_B["default"].weight.flatten(1)
            d = m.scaling["default"] * B @ A
            out[n] = (float(torch.linalg.matrix_norm(d, "nuc")), float(m.base_layer.weight.flatten(1).norm()))
        elif hasattr(m, "delta_weight") and hasattr(m, "s"):
            d = m.delta_weight().flatten(1)
            out[n] = (float(torch.linalg.matrix_norm(d, "nuc")), float(m.weight_ref.flatten(1).norm()), float(m.s.sum()))
    return out

def main(method, seed, lr, setting):
    spec = dict(task="fashion-mnist", examples=2400, seed=seed, max_length=48, eval_examples=2000,
                image_size=32, epochs=3, batch_size=32, lr=lr, device="cpu", threads=1, method=method,
                output_dir=os.path.join(HERE, "results", "runs", f"bnprobe_{method}_{seed}_{setting}"), recalibrate_bn=False)
    pool, ev = pool_eval(spec)
    rec = dict(method=method, seed=seed, lr=lr, setting=setting)
    t0 = time.time()
    if method == "debora":
        from debora.train import train
        ov = fc._task_config(spec, epochs=3, batch_size=32, lr=lr, output_dir=spec["output_dir"], progress=False,
                             plots=False, eval_every=0, threads=1, device="cpu", overwrite=True, target_rank=setting,
                             recalibrate_bn=False)
        res = train(TrainConfig.from_preset("default", **ov))
        model = res.model
        rec["acc_reported"] = res.summary["eval_acc_end"]
    else:
        holder = {}
        def hook(model, evaluate):
            holder["m"] = model
        r = fc.run_peft(dict(spec, setting_value=setting), on_trained=hook)
        rec["acc_reported"] = r["acc"]; model = holder["m"]
    rec["acc_running"] = acc(model, ev)
    rec["nuc"] = nuc_norms(model)
    recalibrate(model, pool)
    rec["acc_recal"] = acc(model, ev)
    rec["wall"] = time.time() - t0
    with open(OUT, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(method, seed, setting, rec["acc_reported"], rec["acc_running"], rec["acc_recal"], flush=True)

OUT = os.path.join(HERE, "results", "bn_probe.jsonl")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
