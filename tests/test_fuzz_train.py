"""Hypothesis fuzz of ``debora train``: random option values and random CSV files (labels of every
kind, empty texts, few rows) on a tiny BERT. Every run either exits 0 with finite parameters, or
fails with a one-line error naming the problem; a refused run (exit 2) leaves the output directory
as it was, an aborted one (exit 3, non-finite) leaves no non-finite checkpoint or adapter."""
from __future__ import annotations

import csv
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from debora.cli import main
from debora.train import checkpoint as ckpt
from test_train_tiny import FILL, NEG, POS, make_tiny_model, one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("fuzz") / "bert"))


WORDS = POS + NEG + FILL
texts = st.one_of(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join),
                  st.sampled_from(["", "  "]))
label_kinds = st.sampled_from(["binary", "strings", "sparse", "binary", "strings", "sparse",
                               "one", "ids", "mixed", "floats"])
VALID = {"lr": ["1e-3", "0.05", "3", "1e30"], "tau": ["2", "0.5", "40"], "epochs": ["1", "0.1", "1e5"],
         "head-lr": ["1e-3", "10"], "batch-size": ["4", "8", "64"]}
INVALID = {"lr": ["nan", "inf", "-1", "0"], "tau": ["nan", "-inf", "0", "1e-4"],
           "epochs": ["inf", "0", "1e30"], "head-lr": ["-1", "nan"], "batch-size": ["0", "2.5", "-3"]}
# at most one option is invalid per run (the others valid), so that runs often get past validation
# and exercise data, training and saving


def _label(kind: str, i: int):
    return {"binary": i % 2, "strings": ["neg", "pos"][i % 2], "sparse": [3, 1000000][i % 2], "one": 1,
            "ids": i, "mixed": ["pos", 0, 1][i % 3], "floats": [0.5, 1.5][i % 2]}[kind]


def _snapshot(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def _finite_files(out):
    ck = os.path.join(out, "checkpoint")
    if ckpt.resolve(ck):
        for group in ckpt.load(ck)[0].values():
            assert not ckpt.nonfinite_names(group)
    w = os.path.join(out, "adapter", "adapter_model.safetensors")
    if os.path.isfile(w):
        assert not ckpt.nonfinite_names(load_file(w))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(4, 40), kind=label_kinds, words=st.lists(texts, min_size=40, max_size=40),
       bad=st.sampled_from([None, None, None] + sorted(INVALID)), data=st.data(),
       iters=st.integers(1, 2), used_dir=st.booleans(),
       extra=st.sampled_from([[], ["--overwrite"], ["--resume", "auto"], ["--allow-many-classes"]]))
def test_fuzz_cli_runs_cleanly_or_fails_cleanly(bert, rows, kind, words, bad, data, iters, used_dir, extra):
    values = {k: data.draw(st.sampled_from(INVALID[k] if k == bad else VALID[k]), label=k) for k in VALID}
    tmp = tempfile.mkdtemp(prefix="fuzz-")
    try:
        data = os.path.join(tmp, "d.csv")
        with open(data, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sentence", "sentiment"])
            for i in range(rows):
                w.writerow([words[i], _label(kind, i)])
        out = os.path.join(tmp, "out")
        if used_dir:
            os.makedirs(out)
            with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
                fh.write('{"kind": "start", "iteration": 0}\n')
        before = _snapshot(out) if os.path.isdir(out) else None
        args = ["train", "--model", bert, "--dataset", data, "--text-column", "sentence", "--label-column",
                "sentiment", "--init-rank", "2", "--max-iterations", str(iters), "--max-length", "12",
                "--output-dir", out, "--device", "cpu", "--no-progress", "--no-plots",
                "--target-modules", "query,value", *extra]
        for k, v in values.items():
            args += [f"--{k}", v]
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(args)
            except SystemExit as exit_:          # argparse: a value of the wrong type (e.g. "2.5")
                rc = exit_.code
        message = err.getvalue().strip()
        if rc == 0:
            weights = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
            assert not ckpt.nonfinite_names(weights)
            _finite_files(out)
            return
        lines = [ln for ln in message.splitlines() if ln.strip()]
        assert rc in (2, 3), (rc, message)
        assert lines and ("error:" in lines[-1] or "aborted:" in lines[-1]), message
        if rc == 2 and "usage:" not in message:
            assert len(lines) == 1, message
        if rc == 2:
            assert (_snapshot(out) if os.path.isdir(out) else None) == before, message
        else:
            _finite_files(out)
            assert not os.path.exists(os.path.join(out, "adapter"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
