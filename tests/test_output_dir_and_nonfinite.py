"""A run never destroys an earlier one, writes nothing before set-up succeeded, and never saves NaN:
parameters are checked after every outer iteration, and a non-finite run exits non-zero with its last
checkpoint finite and untouched."""
from __future__ import annotations

import os

import pytest
import torch

import debora
from debora.cli import main
from debora.train import train
from debora.train import checkpoint as ckpt
from debora.train.loop import NonFiniteError
from test_resume_checks import _snapshot
from test_train_tiny import make_dataset, make_tiny_model, one_thread, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outdir")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_config(tmp, max_iterations=2, eval_every=0)
    train(cfg)
    torch.set_num_threads(n)
    return tmp, cfg


def _clone(earlier, tmp_path):
    import shutil
    src, cfg = earlier
    dst = tmp_path / "run"
    shutil.copytree(cfg.output_dir, dst)
    return cfg.replace(output_dir=str(dst)), str(dst)


def test_non_empty_output_dir_is_refused_and_left_as_it_was(earlier, tmp_path):
    cfg, out = _clone(earlier, tmp_path)
    before = _snapshot(out)
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) > 1
    with pytest.raises(ValueError, match="is not empty .*--resume auto.*--overwrite"):
        train(cfg)
    assert _snapshot(out) == before


def test_resume_auto_without_checkpoint_does_not_wipe_the_dir(earlier, tmp_path):
    import shutil
    cfg, out = _clone(earlier, tmp_path)
    shutil.rmtree(os.path.join(out, "checkpoint"))
    before = _snapshot(out)
    with pytest.raises(ValueError, match="--resume auto: output_dir .* has no checkpoint to continue"):
        train(cfg.replace(resume="auto"))
    assert _snapshot(out) == before
    fresh = tmp_path / "fresh"
    res = train(cfg.replace(resume="auto", output_dir=str(fresh), max_iterations=1))   # empty: starts
    assert res.state.iteration == 1


def test_cli_failed_run_in_used_dir_changes_nothing(earlier, tmp_path, capsys):
    cfg, out = _clone(earlier, tmp_path)
    before = _snapshot(out)
    base = ["train", "--model", cfg.model, "--dataset", cfg.dataset, "--text-column", "sentence",
            "--label-column", "sentiment", "--output-dir", out, "--device", "cpu", "--no-progress"]
    for extra, match in ((["--lr", "nan"], "lr must be a finite number"),
                         (["--lr", "inf"], "lr must be a finite number"),
                         (["--epochs", "inf"], "epochs must be a finite number"),
                         (["--head-lr", "-1"], "head_lr must be > 0"),
                         ([], "is not empty"), (["--overwrite", "--label-column", "nope"], "no column 'nope'")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert _snapshot(out) == before


def test_failed_setup_creates_no_output_dir(tmp_path):
    out = tmp_path / "fresh" / "run"
    with pytest.raises(ValueError, match="no column 'stars'"):
        train(tiny_config(tmp_path, output_dir=str(out), label_column="stars"))
    assert not (tmp_path / "fresh").exists()


def test_overwrite_replaces_the_earlier_run(earlier, tmp_path):
    cfg, out = _clone(earlier, tmp_path)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    res = train(cfg.replace(overwrite=True, max_iterations=1))
    assert res.state.iteration == 1
    lines = [ln for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert '"kind": "start"' in lines[0] and '"kind": "end"' in lines[-1]
    assert ckpt.load(os.path.join(out, "checkpoint"))[1]["iteration"] == 1
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"     # not ours: kept


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        train(tiny_config(tmp_path, output_dir=str(f)))
    with pytest.raises(ValueError, match="cannot be created: .* is a file"):
        train(tiny_config(tmp_path, output_dir=str(f / "sub")))
    assert f.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            train(tiny_config(tmp_path, output_dir=str(ro / "run")))
    finally:
        ro.chmod(0o755)


def test_output_dir_not_writable_is_reported(tmp_path, monkeypatch):
    """Same as above where the tests run as root: the permission answer is simulated."""
    from debora.train import outdir
    real = os.access
    monkeypatch.setattr(outdir.os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro"))
                        else real(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(ValueError, match="is not writable"):
        train(tiny_config(tmp_path, output_dir=str(tmp_path / "ro" / "run")))
    assert os.listdir(tmp_path / "ro") == []


def _poison_after(monkeypatch, calls_before_nan: int):
    """Make the lower step write NaN into one adapter basis on its ``calls_before_nan``-th call (what
    an exploding learning rate does)."""
    import debora.train.loop as loop
    real = debora.retract
    count = {"n": 0}

    def retract(model):
        real(model)
        count["n"] += 1
        if count["n"] == calls_before_nan:
            p = next(iter(debora.lower_parameters(model).values()))
            with torch.no_grad():
                p.view(-1)[0] = float("nan")

    monkeypatch.setattr(loop.debora, "retract", retract)


def test_nan_parameters_abort_and_are_never_saved(tmp_path, monkeypatch):
    _poison_after(monkeypatch, 3)
    cfg = tiny_config(tmp_path, max_iterations=6, checkpoint_every=1, eval_every=0)
    with pytest.raises(NonFiniteError, match="aborting at iteration 3: 1 parameter tensors hold NaN/Inf"):
        train(cfg)
    out = cfg.output_dir
    assert not os.path.exists(os.path.join(out, "adapter"))
    tensors, meta = ckpt.load(os.path.join(out, "checkpoint"))
    assert meta["iteration"] == 2
    for group in tensors.values():
        assert not ckpt.nonfinite_names(group)


def test_cli_nan_parameters_exit_non_zero(tmp_path, monkeypatch, capsys):
    _poison_after(monkeypatch, 1)
    model, data = make_tiny_model(str(tmp_path / "bert")), make_dataset(str(tmp_path / "d.csv"), n=60)
    rc = main(["train", "--model", model, "--dataset", data, "--text-column", "sentence", "--label-column",
               "sentiment", "--init-rank", "2", "--tau", "2", "--max-iterations", "2", "--batch-size", "8",
               "--output-dir", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 3 and "NaN/Inf" in err and "untouched" in err
    assert not (tmp_path / "o" / "adapter").exists() and not (tmp_path / "o" / "checkpoint").exists()


def test_huge_learning_rate_never_saves_nan(tmp_path):
    """``--lr 1e30`` (finite, so accepted): the run either aborts (non-finite) or ends with finite
    parameters; whatever it saved is finite."""
    cfg = tiny_config(tmp_path, lr=1e30, max_iterations=3, checkpoint_every=1, eval_every=0)
    try:
        res = train(cfg)
    except NonFiniteError:
        pass
    else:
        for p in {**debora.upper_parameters(res.model), **debora.lower_parameters(res.model)}.values():
            assert torch.isfinite(p).all()
    ck = os.path.join(cfg.output_dir, "checkpoint")
    if ckpt.resolve(ck):
        for group in ckpt.load(ck)[0].values():
            assert not ckpt.nonfinite_names(group)
    adapter = os.path.join(cfg.output_dir, "adapter")
    if os.path.isdir(adapter):
        from safetensors.torch import load_file
        assert not ckpt.nonfinite_names(load_file(os.path.join(adapter, "adapter_model.safetensors")))


def test_save_pretrained_refuses_nan(tmp_path):
    from test_debora_io import _bert_adapted
    model = _bert_adapted("euclidean")
    layer = next(iter(debora.adapter_layers(model).values()))
    with torch.no_grad():
        layer.s[0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save adapters .* NaN/Inf"):
        debora.save_pretrained(model, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
