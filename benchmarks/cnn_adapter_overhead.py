"""Step time of CP conv adapters vs PEFT LoRA on the packaged EfficientNet-Lite0 (the image path).

One training step (forward + backward of the cross-entropy, batch ``--batch`` of ``--size`` px images)
of the same network adapted on the same convolutions (``debora.train.models.default_targets``: the
1×1 convolutions of the MBConv blocks and the head) with:

* ``peft``      PEFT LoRA at rank r (Conv2d LoRA: a 1×1 conv in → r, then r → out);
* ``cp``        dEBORA's CP adapter at init_rank r, on its pointwise path (1×1 kernels: two 1×1 convs);
* ``cp-4conv``  the same adapter forced onto the general CP path (1×1 conv, two depthwise 1-tap
                convs, 1×1 conv): what every CP adapter ran before the pointwise path existed.

Time is the process CPU time of one thread (other processes perturb it far less than wall time), the
best of ``--reps`` interleaved repetitions of ``--steps`` steps each; the ratios to PEFT are printed.

    .venv/bin/python benchmarks/cnn_adapter_overhead.py
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def build(rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    import debora
    from debora.train.models import default_modules_to_save, default_targets, load_image_model

    torch.manual_seed(0)
    base, _ = load_image_model(None, 10)
    targets = default_targets(base, "image")
    head = default_modules_to_save(base, "image")
    peft_base = copy.deepcopy(base)
    named = dict(peft_base.named_modules())
    for name in targets:   # as finetune_compare.run_peft: 1×1 stride-1 "same" convs are plain convs
        named[name].__class__ = torch.nn.Conv2d
    peft_model = get_peft_model(peft_base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                      lora_dropout=0.0, modules_to_save=head))
    cfg = debora.DeboraConfig(target_modules=targets, init_rank=rank, alpha=alpha, modules_to_save=head,
                              basis="oblique", init_seed=0)
    ours = debora.inject(copy.deepcopy(base), cfg)
    general = copy.deepcopy(ours)
    layers = debora.adapter_layers(general)
    assert all(l.pointwise for l in layers.values()), "expected 1×1 targets only"
    for layer in layers.values():
        layer.pointwise = False
    return {"peft": peft_model, "cp": ours, "cp-4conv": general}, len(targets)


def step(model, x, y):
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad = None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="append one JSON record with the results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, n_layers = build(args.rank, args.alpha)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    with torch.no_grad():   # the same outputs (up to float32 rounding): the same network
        outs = {k: m.eval()(x) for k, m in models.items()}
    for k in ("cp", "cp-4conv"):
        torch.testing.assert_close(outs[k], outs["cp"], rtol=1e-4, atol=1e-4)
    for m in models.values():
        m.train()
        step(m, x, y)    # warm-up
    best = {k: float("inf") for k in models}
    for _ in range(args.reps):
        for k, m in models.items():     # interleaved
            t0 = time.process_time()
            for _ in range(args.steps):
                step(m, x, y)
            best[k] = min(best[k], (time.process_time() - t0) / args.steps)
    rec = {"rank": args.rank, "batch": args.batch, "size": args.size, "layers": n_layers,
           "threads": args.threads, "step_s": best,
           "ratio_to_peft": {k: best[k] / best["peft"] for k in best}}
    print(f"EfficientNet-Lite0, {n_layers} adapted 1×1 convs, rank {args.rank}, batch {args.batch} at "
          f"{args.size} px, {args.threads} thread(s); CPU time per training step (best of {args.reps}):")
    for k in models:
        print(f"  {k:9s} {1000 * best[k]:8.1f} ms   {rec['ratio_to_peft'][k]:.2f}× PEFT LoRA")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
