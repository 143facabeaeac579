"""``debora train`` on the command line: flags, --config files, errors, ``python -m debora``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from debora.cli import build_parser, config_from_args, main
from test_train_tiny import make_dataset, make_tiny_model, one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return make_tiny_model(str(tmp / "bert")), make_dataset(str(tmp / "d.csv"))


def _args(model, data, out, *extra):
    return ["train", "--model", model, "--dataset", data, "--text-column", "sentence", "--label-column",
            "sentiment", "--init-rank", "2", "--tau", "2", "--eps", "0.001", "--budget", "per_layer",
            "--basis", "oblique", "--estimator", "debora-closed-form", "--inner-steps", "2",
            "--fw-step", "short", "--epochs", "1", "--batch-size", "16", "--max-length", "16",
            "--output-dir", str(out), "--seed", "3", "--device", "cpu", "--no-progress",
            "--target-modules", "query,value", *extra]


def test_cli_train_end_to_end(assets, tmp_path, capsys):
    model, data = assets
    out = tmp_path / "out"
    rc = main(_args(model, data, out, "--export-peft"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "dEBORA training summary" in captured.out and "trainable parameters" in captured.out
    for name in ("metrics.jsonl", "summary.md", "summary.json", "ranks.png", "fw_gap.png",
                 "s_trajectories.png", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "adapter").is_dir() and (out / "peft").is_dir() and (out / "checkpoint").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["basis"] == "oblique" and summary["budget"] == "per_layer"
    assert set(summary["ranks_end"]) == {f"bert.encoder.layer.{i}.attention.self.{m}"
                                         for i in (0, 1) for m in ("query", "value")}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["inner_steps"] == 2 and cfg["seed"] == 3 and cfg["target_modules"] == ["query", "value"]


def test_config_file_yaml_and_json(assets, tmp_path):
    model, data = assets
    yml = tmp_path / "c.yaml"
    yml.write_text(f"preset: paper\nmodel: {model}\ndataset: {data}\ntext-column: sentence\n"
                   f"label_column: sentiment\ntau: 3.5\nepochs: 1\n")
    args = build_parser().parse_args(["train", "--config", str(yml), "--tau", "2.5"])
    cfg = config_from_args(args)
    assert cfg.tau == 2.5 and cfg.preset == "paper" and cfg.alpha == 32 and cfg.text_column == "sentence"
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"model": model, "dataset": data, "budget": "per_layer", "fw_step": "open-loop"}))
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(js)]))
    assert cfg.budget == "per_layer" and cfg.fw_step == "open-loop"


def test_presets():
    paper = config_from_args(build_parser().parse_args(["train", "--preset", "paper"]))
    assert (paper.alpha, paper.weight_decay, paper.dropout, paper.split, paper.estimator) == \
        (32.0, 1e-3, 0.0, "halves", "debora-closed-form")
    default = config_from_args(build_parser().parse_args(["train", "--preset", "default"]))
    assert default.preset == "default" and default.dataset == "rotten-tomatoes" and default.model is None


def test_cli_errors_are_clear(assets, tmp_path, capsys):
    model, data = assets
    assert main(_args(model, data, tmp_path / "o", "--tau", "0")) == 2
    assert "tau" in capsys.readouterr().err
    assert main(_args(model, data, tmp_path / "o", "--eps", "2")) == 2
    assert "eps*init_rank" in capsys.readouterr().err
    assert main(_args(model, str(tmp_path / "nope.csv"), tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_args(model, data, tmp_path / "o", "--label-column", "stars")) == 2
    assert "no column 'stars'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "mapping" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2


def test_python_dash_m_debora(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "debora", "train", "--preset", "paper", "--tau", "4",
                          "--print-config"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["tau"] == 4 and cfg["preset"] == "paper"
    out = subprocess.run([sys.executable, "-m", "debora", "train", "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0 and "--target-modules" in out.stdout and "--resume" in out.stdout
