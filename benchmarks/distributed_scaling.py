"""Distributed scaling of ``debora train``: training examples per second with 1, 2, … processes.

Each point is one ``torchrun --standalone --nproc_per_node=N -m debora train …`` launch (a plain
``python -m debora train`` for N = 1, so the single-process path is the one users run) with the same
per-process batch (weak scaling: the global batch is N × batch). Throughput is measured from the
run's own metrics: (global batch × outer iterations) / wall seconds between the first and the last
logged training iteration, so start-up, data loading and the evaluations at start and end are left
out. One outer iteration = ``inner_steps`` lower steps + one Frank-Wolfe step (the default path:
fused first-order hypergradient, truncation on the cubic schedule).

CPU (this machine; gloo):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/distributed_scaling.py \\
        --nprocs 1,2 --iterations 30

GPU machine (nccl, one process per GPU, cuda:LOCAL_RANK):

    .venv/bin/python benchmarks/distributed_scaling.py --device cuda --backend nccl --nprocs 1,2,4,8 \\
        --batch-size 32 --iterations 100 --model microsoft/deberta-v3-base --max-length 128

Prints a markdown table (and the command) and writes ``benchmarks/results/distributed_scaling_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_point(n: int, args, out_dir: str) -> dict:
    flags = ["train", "--output-dir", out_dir, "--overwrite", "--no-plots", "--no-progress",
             "--device", args.device, "--batch-size", str(args.batch_size), "--max-iterations",
             str(args.iterations), "--max-examples", str(args.max_examples), "--max-eval-examples", "64",
             "--eval-every", "0", "--max-length", str(args.max_length), "--threads", str(args.threads),
             "--dataset", args.dataset, "--epochs", "100"]
    if args.model:
        flags += ["--model", args.model]
    if n == 1:
        cmd = [sys.executable, "-m", "debora", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "debora", *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    first, last = train[0], train[-1]
    iters = last["iteration"] - first["iteration"]
    seconds = last["time"] - first["time"]
    gb = summary["global_batch"]
    return {"processes": n, "batch_per_process": args.batch_size, "global_batch": gb,
            "iterations_timed": iters, "seconds": round(seconds, 3),
            "examples_per_s": round(iters * gb / seconds, 2), "iterations_per_s": round(iters / seconds, 3),
            "launch_wall_s": round(wall, 1), "world_size": summary["world_size"],
            "rank_end": summary["rank_end"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda (one process per GPU)")
    p.add_argument("--backend", default=None, help="gloo (cpu) | nccl (cuda); checked against --device")
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--iterations", type=int, default=30, help="outer iterations per run")
    p.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--max-examples", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    args = p.parse_args(argv)
    want = "nccl" if args.device.startswith("cuda") else "gloo"
    if args.backend is not None and args.backend != want:
        raise SystemExit(f"--backend {args.backend}: debora train uses {want} on --device {args.device}")
    counts = [int(v) for v in args.nprocs.split(",") if v.strip()]
    tmp = tempfile.mkdtemp(prefix="debora-scaling-")
    rows = []
    try:
        for n in counts:
            rows.append(run_point(n, args, os.path.join(tmp, f"n{n}")))
            print(f"  {n} process(es): {rows[-1]['examples_per_s']} examples/s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["examples_per_s"]
    command = "python benchmarks/distributed_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`{command.strip()}` (device {args.device}, backend {want}, {os.cpu_count()} CPU cores, "
             f"{args.threads} thread(s) per process)", "",
             "| processes | batch / process | global batch | examples/s | speed-up vs first row |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['batch_per_process']} | {r['global_batch']} | {r['examples_per_s']} | "
              f"{r['examples_per_s'] / base:.2f}× |" for r in rows]
    print("\n".join(lines))
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"distributed_scaling_{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"command": command.strip(), "device": args.device, "backend": want,
                   "cpu_count": os.cpu_count(), "threads_per_process": args.threads, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
