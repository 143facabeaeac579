"""Several processes: ``torchrun -m debora train`` with DDP (gloo, CPU, 2 processes, tiny BERT without
dropout). One worker launch (tests/dist_worker.py) runs the in-process scenarios; the command line is
launched for a kill (test hook) and a resume. Every launch has a timeout, and collectives time out
after DEBORA_DIST_TIMEOUT seconds, so a desync fails instead of hanging."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from debora.train import train
from debora.train.distributed import shard
from debora.train.metrics import read_metrics
from debora.train.resume import check_world_size
from dist_worker import CG, DEFAULT, FISHER, LEARN_LOG_S, LEARN_S, RESUME, SVD, TAYLOR
from test_train_tiny import make_dataset, make_tiny_model, one_thread, tiny_config  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DEBORA_DIST_TIMEOUT="60", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DEBORA_TEST_NAN",
              "DEBORA_TEST_EXIT_AT"):
        env.pop(k, None)
    return env


def _torchrun(args, timeout=300, **extra_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = _env()
    env.update(extra_env)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    make_tiny_model(str(tmp / "tiny_bert"))
    make_dataset(str(tmp / "data.csv"))
    return tmp


@pytest.fixture(scope="module")
def worker(base):
    proc = _torchrun([os.path.join(HERE, "dist_worker.py"), str(base)], timeout=400)
    reports = []
    for r in (0, 1):
        path = base / f"worker_rank{r}.json"
        assert path.is_file(), proc.stderr[-4000:]
        reports.append(json.loads(path.read_text()))
    assert proc.returncode == 0 and all(r["ok"] for r in reports), \
        (reports[0].get("error") or reports[1].get("error") or proc.stderr[-4000:])
    return reports


@pytest.fixture(scope="module")
def reference(base):
    """One process with twice the per-process batch: the runs two processes must reproduce."""
    out = {}
    # the SVD cut re-factorises: one process with batch 16 and one with 8 x grad_accum 2 end 7.8e-5 apart
    # (float32 summation order; 2.3e-6 for Frank-Wolfe on s), so its reference sums the gradient as DDP
    # does, the mean of two half-batch means
    for name, over in (("default", DEFAULT), ("cg", CG), ("svd", SVD), ("taylor", TAYLOR),
                       ("fisher", FISHER), ("learn_s", LEARN_S), ("learn_log_s", LEARN_LOG_S)):
        batch = (dict(batch_size=8, grad_accum=2) if name in ("svd", "taylor", "fisher", "learn_s", "learn_log_s")
                 else dict(batch_size=16))
        cfg = tiny_config(base, output_dir=str(base / f"one_{name}"), **dict(over, **batch))
        out[name] = train(cfg).output_dir
    return out


def _train_records(run_dir):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _assert_same_run(got_dir, want_dir, rtol=1e-5):
    got, want = _train_records(got_dir), _train_records(want_dir)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] and got
    for a, b in zip(got, want):
        assert a["ranks"] == b["ranks"], a["iteration"]       # the same truncations
        for layer in b["s"]:
            assert _rel(torch.tensor(a["s"][layer]), torch.tensor(b["s"][layer])) <= rtol, (a["iteration"], layer)
    ta = load_file(glob.glob(os.path.join(got_dir, "adapter", "*.safetensors"))[0])
    tb = load_file(glob.glob(os.path.join(want_dir, "adapter", "*.safetensors"))[0])
    assert set(ta) == set(tb)
    for k in tb:
        assert ta[k].shape == tb[k].shape, k
        assert _rel(ta[k].double(), tb[k].double()) <= rtol, k


@pytest.mark.parametrize("name", ["default", "cg", "svd", "taylor", "fisher", "learn_s", "learn_log_s"])
def test_two_processes_match_one_process_with_twice_the_batch(worker, reference, base, name):
    run = str(base / f"ddp_{name}")
    _assert_same_run(run, reference[name])
    # rank 0 alone wrote: one checkpoint, one metrics file with one record per iteration
    assert sorted(os.listdir(run)).count("checkpoint") == 1
    assert not glob.glob(os.path.join(run, "checkpoint.*")) and len(glob.glob(os.path.join(run, "*.jsonl"))) == 1
    iters = [r["iteration"] for r in _train_records(run)]
    assert len(iters) == len(set(iters))
    summary = json.loads((base / f"ddp_{name}" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16 and summary["batch_size"] == 8
    one = json.loads((base / f"one_{name}" / "summary.json").read_text())
    assert one["world_size"] == 1 and one["rank_end"] == summary["rank_end"]
    assert summary["eval_acc_end"] == pytest.approx(one["eval_acc_end"], abs=1e-12)


def test_truncation_under_ddp_keeps_the_hooks_live(worker):
    for rep in worker:
        hooks = rep["hooks"]
        assert rep["default_removed"] > 0 and hooks["at"] >= 1
        assert hooks["ddp_module_is_model"] and hooks["ddp_holds_current_params"] and hooks["ddp_ignores_s"]
        assert hooks["every_param_has_grad"], "a remaining parameter got no gradient after truncation"
        assert hooks["grads_equal_across_ranks"], "gradients were not all-reduced after the re-wrap"
    assert worker[0]["hooks"]["grad_norm"] == worker[1]["hooks"]["grad_norm"]


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_under_ddp_reproduces_the_trajectory(worker, base, name):
    for rep in worker:
        assert rep[f"resume_{name}_s_equal"]
    full, cut = _train_records(base / f"full_{name}"), _train_records(base / f"cut_{name}")
    assert [r["iteration"] for r in full] == [r["iteration"] for r in cut]
    for a, b in zip(full, cut):
        assert a["ranks"] == b["ranks"] and a["s"] == b["s"] and a["lower_loss"] == b["lower_loss"]
    state = worker[0][f"resume_{name}_est_state"]
    est = load_file(str(base / f"cut_{name}" / "checkpoint" / "estimator.safetensors"))
    if name == "cg":        # the warm start is checkpointed
        assert state["warm"] and any(k.startswith("warm|") for k in est)
    if name == "stochastic-neumann":   # and the generator
        assert state["rng"] and "rng" in est


def test_nan_on_one_rank_is_skipped_on_all_ranks(worker, base):
    assert [rep["nan_skipped"] for rep in worker] == [2, 2]      # the lower step and the FW step
    assert [rep["nan_iterations"] for rep in worker] == [6, 6]   # no desync, no hang
    records = read_metrics(str(base / "ddp_nan" / "metrics.jsonl"))
    nonfinite = [r for r in records if r["kind"] == "nonfinite"]
    assert [r["iteration"] for r in nonfinite] == [3, 3] and nonfinite[-1]["count"] == 2
    assert json.loads((base / "ddp_nan" / "summary.json").read_text())["nonfinite_skipped"] == 2


@pytest.fixture(scope="module")
def cli_kill(base):
    """``torchrun -m debora train`` killed after iteration 6's checkpoint, then ``--resume auto``."""
    cfg = tiny_config(base, output_dir=str(base / "cli"), checkpoint_every=3, **DEFAULT).to_dict()
    cfg_file = base / "cli.json"
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "preset"}))
    args = ["-m", "debora", "train", "--config", str(cfg_file)]
    killed = _torchrun(args, DEBORA_TEST_EXIT_AT="6")
    assert killed.returncode != 0, killed.stderr[-3000:]
    snapshot = base / "cli_at_6"
    shutil.copytree(base / "cli", snapshot)
    resumed = _torchrun(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base / "cli", snapshot, resumed


def test_torchrun_cli_kill_and_resume(cli_kill, reference):
    run, snapshot, resumed = cli_kill
    assert "dEBORA training summary" in resumed.stdout and resumed.stdout.count("dEBORA training summary") == 1
    assert json.loads((snapshot / "checkpoint" / "state.json").read_text())["iteration"] == 6
    _assert_same_run(str(run), reference["default"])
    kinds = [r["kind"] for r in read_metrics(str(run / "metrics.jsonl"))]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds.count("end") == 1


def test_resume_with_another_number_of_processes(cli_kill, reference, base):
    _, snapshot, _ = cli_kill
    # 2 processes x 8 -> 1 process x 16: the same global batch, no dropout: exact
    one = base / "from_two"
    shutil.copytree(snapshot, one)
    cfg = tiny_config(base, output_dir=str(one), resume="auto", **dict(DEFAULT, batch_size=16))
    train(cfg)
    _assert_same_run(str(one), reference["default"])
    # another global batch: refused, naming both
    other = base / "from_two_b8"
    shutil.copytree(snapshot, other)
    with pytest.raises(ValueError, match=r"2 process\(es\) with --batch-size 8 \(global batch 16\).*1 with "
                                         r"--batch-size 8 \(global batch 8\)"):
        train(tiny_config(base, output_dir=str(other), resume="auto", **DEFAULT))


def test_shard_weights_make_the_global_mean():
    idx = list(range(10, 17))                         # an uneven last batch of 7 over 2 ranks
    parts = [shard(idx, r, 2) for r in range(2)]
    assert parts[0][0] + parts[1][0] == idx
    # mean over ranks of w_r * (shard mean) = mean over the global batch
    x = torch.arange(7, dtype=torch.float64)
    means = [x[[i - 10 for i in p]].mean() * w for p, w in parts]
    assert float(sum(means) / 2) == pytest.approx(float(x.mean()))
    assert shard([5], 1, 2) == ([5], 0.0)             # an empty shard: one example with weight 0
    assert shard(list(range(8)), 1, 2) == ([4, 5, 6, 7], 1.0)


def test_world_size_check_messages():
    assert check_world_size(2, 8, 2, 8, "ckpt") is False
    assert check_world_size(2, 8, 1, 16, "ckpt") is True
    with pytest.raises(ValueError, match="global batch 16.*global batch 12.*--batch-size 5|global batch 16"):
        check_world_size(2, 8, 3, 4, "ckpt")
    with pytest.raises(ValueError, match="dropout"):
        check_world_size(2, 8, 1, 16, "ckpt", has_dropout=True)
