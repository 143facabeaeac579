"""Which components should go? A post-hoc probe of selection rules at a fixed rank budget.

Train dEBORA once without pruning (``target_rank = init_rank``), then cut every adapter down to the
same total rank by several rules and evaluate each cut on the held-out split, without retraining:

* ``s-per-layer``    keep the k largest s in each layer (uniform ranks);
* ``s-global``       keep the k·L largest s over all layers (what the count budget does);
* ``random``         keep k random components per layer (the ablation);
* ``svd-per-layer``  replace each layer's update ΔW = scaling·U diag(s) Vᵀ by its best rank-k
                     approximation (Eckart–Young, via QR of U and V and an r×r SVD);
* ``svd-global``     the k·L largest singular values over all layers (one global allocation).

With oblique bases ‖u_i‖ = ‖v_i‖ = 1, so Σ_i s_i ≥ ‖U diag(s) Vᵀ‖_* = Σ σ_j: the SVD re-factorisation
of a feasible s stays feasible for the FW set {Σ s ≤ τ}. If the components are correlated (the theory
checks found them collapsing onto each other), the SVD cut loses far less of ΔW than any subset of
components does. The records (one JSON line per seed) say which rule keeps the accuracy.

    .venv/bin/python benchmarks/truncation_probe.py --seed 0 --out benchmarks/results/truncation_probe.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import debora  # noqa: E402
from debora.refactor import _svd  # noqa: E402
from debora.train import TrainConfig, train  # noqa: E402


@torch.no_grad()
def layer_svd(layer):
    """(P, σ, Q) with scaling·U diag(s) Vᵀ = P diag(σ) Qᵀ (debora.refactor's factorisation)."""
    P, sig, Q = _svd(layer)
    return P, sig * layer.scaling, Q


@torch.no_grad()
def set_components(layer, U, V, s):
    layer._set_params(s, {"U": U, "V": V})


@torch.no_grad()
def cut(model, rule: str, k: float, generator: torch.Generator):
    layers = debora.adapter_layers(model)
    total = int(round(k * len(layers)))
    if rule in ("s-per-layer", "random"):
        for layer in layers.values():
            r = layer.rank
            idx = (torch.topk(layer.s, int(k)).indices if rule == "s-per-layer"
                   else torch.randperm(r, generator=generator)[: int(k)])
            layer.keep_(torch.sort(idx).values)
    elif rule == "s-global":
        allv = torch.cat([l.s for l in layers.values()])
        chosen = torch.zeros(allv.numel(), dtype=torch.bool)
        chosen[torch.topk(allv, total).indices] = True
        start = 0
        for layer in layers.values():
            r = layer.rank
            layer.keep_(torch.nonzero(chosen[start:start + r]).flatten())
            start += r
    elif rule in ("svd-per-layer", "svd-global"):
        svds = {n: layer_svd(l) for n, l in layers.items()}
        if rule == "svd-global":
            allv = torch.cat([sv[1] for sv in svds.values()])
            thresh = torch.topk(allv, total).values[-1]
        for n, layer in layers.items():
            P, sig, Q = svds[n]
            keep = (int(k) if rule == "svd-per-layer" else int((sig >= thresh).sum()))
            set_components(layer, P[:, :keep], Q[:, :keep], sig[:keep] / layer.scaling)
    else:
        raise ValueError(rule)
    return sum(l.rank for l in layers.values())


@torch.no_grad()
def lora_probe(args):
    """Train PEFT LoRA rank ``args.lora`` (finetune_compare's protocol), then cut ΔW = scaling·B A of
    every layer to its best rank-k approximation, per layer and with one global allocation."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import finetune_compare as fc
    rec = {"task": args.task, "seed": args.seed, "config": {"lora": args.lora}, "cuts": {}}
    ks = [float(v) for v in args.ks.split(",")]

    @torch.no_grad()
    def on_trained(model, evaluate):
        mods = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        rec["full"] = evaluate()
        svds = {}
        for n, m in mods.items():
            B = m.lora_B["default"].weight.double()           # [out, r]
            A = m.lora_A["default"].weight.double()           # [r, in]
            qb, rb = torch.linalg.qr(B)
            qa, ra = torch.linalg.qr(A.T)
            p, sig, qt = torch.linalg.svd((rb @ ra.T) * m.scaling["default"])
            svds[n] = (qb @ p, sig, qa @ qt.T, B.clone(), A.clone())
        for k in ks:
            for rule in ("svd-per-layer", "svd-global"):
                total = int(round(k * len(mods)))
                thresh = torch.topk(torch.cat([v[1] for v in svds.values()]), total).values[-1]
                rank = 0
                for n, m in mods.items():
                    P, sig, Q, _, _ = svds[n]
                    keep = int(k) if rule == "svd-per-layer" else int((sig >= thresh).sum())
                    r = sig.numel()
                    sq = (sig[:keep] / m.scaling["default"]).sqrt()
                    Bn = torch.zeros(P.shape[0], r, dtype=torch.float64)
                    An = torch.zeros(r, Q.shape[0], dtype=torch.float64)
                    Bn[:, :keep] = P[:, :keep] * sq
                    An[:keep] = (Q[:, :keep] * sq).T
                    m.lora_B["default"].weight.copy_(Bn)
                    m.lora_A["default"].weight.copy_(An)
                    rank += keep
                acc = evaluate()
                rec["cuts"][f"{rule}@{k:g}"] = {"acc": acc, "rank": rank}
                print(f"lora-r{args.lora} k={k:g} {rule:14s} rank={rank:4d} acc={acc:.4f}", flush=True)
        for n, m in mods.items():                            # restore: the final evaluation is the full one
            m.lora_B["default"].weight.copy_(svds[n][3])
            m.lora_A["default"].weight.copy_(svds[n][4])

    spec = dict(task=args.task, examples=args.examples, seed=args.seed, max_length=48, eval_examples=1000,
                epochs=args.epochs, batch_size=32, lr=5e-4, method=f"lora-r{args.lora}", device="cpu",
                threads=1)
    with torch.enable_grad():
        out = fc.run_peft(spec, on_trained=on_trained)
    rec["train_s"] = out["wall"]
    return rec


def _label(rec) -> str:
    cfg = rec["config"]
    if "lora" in cfg:
        return f"PEFT LoRA r={cfg['lora']}"
    if not cfg:
        return "dEBORA default, unpruned (oblique, FW)"
    return "dEBORA unpruned, " + ", ".join(f"{k}={v}" for k, v in cfg.items())


def report(path: str) -> str:
    """A markdown table of the records in ``path`` (accuracy in %, '–' where a rule was not run)."""
    recs = [json.loads(line) for line in open(path) if line.strip()]
    cols = [f"{rule}@{k}" for k in (1, 2) for rule in ("s-per-layer", "s-global", "random", "svd-per-layer",
                                                       "svd-global")]
    head = ("| trained rank-8 adapter | seed | full | " + " | ".join(c.replace("@", " k=") for c in cols)
            + " |\n|---|---:|---:|" + "---:|" * len(cols))
    rows = []
    for r in recs:
        cells = [f"{100 * r['cuts'][c]['acc']:.1f}" if c in r["cuts"] else "–" for c in cols]
        rows.append(f"| {_label(r)} | {r['seed']} | {100 * r['full']:.1f} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="rotten-tomatoes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=1600)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--debora", default="{}", help="JSON TrainConfig overrides")
    ap.add_argument("--lora", type=int, default=0, help="probe PEFT LoRA of this rank instead")
    ap.add_argument("--out", default="benchmarks/results/truncation_probe.jsonl")
    ap.add_argument("--report", action="store_true", help="print the table of --out's records, no runs")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.out))
        return
    if args.lora:
        rec = lora_probe(args)
        print(json.dumps(rec))
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return
    over = dict(dataset=args.task, max_examples=args.examples, seed=args.seed, max_length=48,
                max_eval_examples=1000, epochs=args.epochs, batch_size=32, lr=5e-4,
                output_dir=f"runs/probe_{args.task}_{args.seed}", progress=False, plots=False,
                eval_every=0, threads=1, overwrite=True, target_rank=8.0)
    over.update(json.loads(args.debora))
    cfg = TrainConfig.from_preset("default", **over)
    t0 = time.time()
    res = train(cfg)
    trainer, model = res.trainer, res.model
    rec = {"task": args.task, "seed": args.seed, "config": json.loads(args.debora),
           "full": trainer.evaluate()["eval_acc"], "train_s": time.time() - t0, "cuts": {}}
    for k in [float(v) for v in args.ks.split(",")]:
        for rule in ("s-per-layer", "s-global", "random", "svd-per-layer", "svd-global"):
            saved = copy.deepcopy(model.state_dict())
            layers0 = {n: l.rank for n, l in debora.adapter_layers(model).items()}
            rank = cut(model, rule, k, torch.Generator().manual_seed(args.seed))
            acc = trainer.evaluate()["eval_acc"]
            rec["cuts"][f"{rule}@{k:g}"] = {"acc": acc, "rank": rank}
            print(f"k={k:g} {rule:14s} rank={rank:4d} acc={acc:.4f}", flush=True)
            # restore the uncut adapters (shapes changed: re-create empty ones, then load)
            for n, l in debora.adapter_layers(model).items():
                l.empty_(layers0[n])
            model.load_state_dict(saved)
    print(json.dumps(rec))
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
