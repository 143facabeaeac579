"""Resume trusts nothing: a config that differs outside the resumable fields, an edited or incomplete
state, a missing or corrupted file are all refused naming the field or file, before the output
directory or the model is touched; a matching checkpoint resumes."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from debora.train import TrainConfig, train
from debora.train import checkpoint as ckpt
from debora.train.resume import RESUMABLE, check_config
from test_checkpoint_format import rewrite
from test_train_tiny import one_thread, tiny_config  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_config(tmp, max_iterations=2, eval_every=0)
    res = train(cfg)
    torch.set_num_threads(n)
    return tmp, cfg, res.output_dir


def _copy(first_run, tmp_path):
    src_tmp, cfg, out = first_run
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    return cfg.replace(output_dir=str(dst), resume="auto", max_iterations=3), str(dst)


def _snapshot(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


@pytest.mark.parametrize("change, field", [({"tau": 3.0}, "tau"), ({"seed": 5}, "seed"),
                                           ({"budget": "per_layer"}, "budget"),
                                           ({"lr": 1e-2, "basis": "oblique"}, "lr")])
def test_changed_config_is_refused_naming_each_field(first_run, tmp_path, change, field):
    cfg, out = _copy(first_run, tmp_path)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=f"config differs in .*{field}: checkpoint"):
        train(cfg.replace(**change))
    assert _snapshot(out) == before          # config.json still tells the truth
    if "basis" in change:
        with pytest.raises(ValueError, match="basis: checkpoint 'euclidean', now 'oblique'"):
            train(cfg.replace(**change))


def test_check_config_allows_only_resumable_fields():
    base = TrainConfig(tau=4.0)
    saved = base.to_dict()
    assert check_config(saved, base.replace(epochs=5.0, max_iterations=9, output_dir="x"), "ck") == [
        "epochs: checkpoint 2.0, now 5.0", "max_iterations: checkpoint None, now 9",
        "output_dir: checkpoint 'runs/debora', now 'x'"]
    assert {"epochs", "max_iterations"} <= RESUMABLE and not {"tau", "seed", "budget", "lr"} & RESUMABLE
    with pytest.raises(ValueError, match="fields this version does not know"):
        check_config(dict(saved, surprise=1), base, "ck")
    # a checkpoint from before the lr schedule existed ran at a constant lr, whatever today's default
    old = {k: v for k, v in saved.items() if k not in ("lr_schedule", "warmup")}
    assert base.lr_schedule == "linear"
    with pytest.raises(ValueError, match="lr_schedule: checkpoint 'constant', now 'linear'"):
        check_config(old, base, "ck")
    assert check_config(old, base.replace(lr_schedule="constant"), "ck") == []
    with pytest.raises(ValueError, match="must be an object"):
        check_config(None, base, "ck")


def test_matching_checkpoint_resumes_with_allowed_changes(first_run, tmp_path):
    cfg, out = _copy(first_run, tmp_path)
    (tmp_path / "run" / "checkpoint.tmp-killed").mkdir()          # a killed write's leftovers
    res = train(cfg.replace(eval_every=1, log_every=1))
    assert res.state.iteration == 3
    assert "checkpoint.tmp-killed" not in os.listdir(out)
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    resume = [r for r in recs if r["kind"] == "resume"]
    assert resume and "max_iterations: checkpoint 2, now 3" in resume[0]["changed"]
    assert json.load(open(os.path.join(out, "config.json")))["max_iterations"] == 3


def _edit_state(out, fn):
    ck = os.path.join(out, "checkpoint")
    meta = json.load(open(os.path.join(ck, "state.json")))
    fn(meta)
    rewrite(ck, "state.json", json.dumps(meta).encode())


EDITS = {
    "iteration -5": (lambda m: m.update(iteration=-5), "'iteration' must be an integer >= 0, got -5"),
    "iteration str": (lambda m: m.update(iteration="7"), "'iteration' must be an integer"),
    "missing samplers": (lambda m: m.pop("samplers"), "the field 'samplers' is missing"),
    "offset past split": (lambda m: m["samplers"]["d2"].update(offset=10 ** 6), "'offset' must be <="),
    "rank/layout": (lambda m: m["ranks"].update({next(iter(m["ranks"])): 99}), "has rank 99"),
    "labels": (lambda m: m.update(labels=["a", "b"]), "trained on the classes"),
    "fw x": (lambda m: m["fw_layout"]["__dict__"].pop("x"), "Frank-Wolfe state must have the fields"),
    "fw n": (lambda m: m["fw_layout"]["__dict__"].update(n=-1), "'n' must be an integer >= 0"),
    "history": (lambda m: m["history"].update(eval_start=3), "'history.eval_start' must be an object"),
    "optimizer key": (lambda m: m["optimizer"]["step_scalar"].update({"nope|step": 1}), "names no lower"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_edited_state_is_refused_before_the_model_is_touched(first_run, tmp_path, name):
    cfg, out = _copy(first_run, tmp_path)
    edit, match = EDITS[name]
    _edit_state(out, edit)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "fw.safetensors",
                                  "rng.safetensors", "state.json"])
def test_missing_or_corrupt_file_is_refused_naming_it(first_run, tmp_path, name):
    cfg, out = _copy(first_run, tmp_path)
    p = os.path.join(out, "checkpoint", name)
    data = bytearray(open(p, "rb").read())
    os.remove(p)
    with pytest.raises(ValueError, match=f"{name} is missing"):
        train(cfg)
    data[len(data) // 2] ^= 0x10
    open(p, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"{name} does not match its SHA-256"):
        train(cfg)


def test_model_group_must_cover_the_model(first_run, tmp_path):
    from safetensors.torch import load_file, save_file
    cfg, out = _copy(first_run, tmp_path)
    ck = os.path.join(out, "checkpoint")
    tensors = load_file(os.path.join(ck, "model.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tmp = os.path.join(str(tmp_path), "m.safetensors")
    save_file(tensors, tmp)
    rewrite(ck, "model.safetensors", open(tmp, "rb").read())
    with pytest.raises(ValueError, match=f"model.safetensors does not match this model: missing .*{dropped}"):
        train(cfg)


def test_explicit_resume_path_must_exist(first_run, tmp_path):
    cfg, out = _copy(first_run, tmp_path)
    with pytest.raises(ValueError, match="no checkpoint there"):
        train(cfg.replace(resume=str(tmp_path / "nowhere")))
    assert ckpt.resolve(os.path.join(out, "checkpoint")) is not None


def _edit_tensors(out, name, fn, tmp_path):
    from safetensors.torch import load_file, save_file
    ck = os.path.join(out, "checkpoint")
    tensors = load_file(os.path.join(ck, name))
    fn(tensors)
    tmp = os.path.join(str(tmp_path), "t.safetensors")
    save_file(tensors, tmp)
    rewrite(ck, name, open(tmp, "rb").read())


@pytest.mark.parametrize("name, edit, match", [
    ("fw.safetensors", lambda t: t["fw.weights"].mul_(2.0), "weights do not combine to x"),
    ("fw.safetensors", lambda t: t.update({"fw.weights": t["fw.weights"][:-1].clone()}),
     "weights do not fit the feasible set"),
    ("fw.safetensors", lambda t: t["fw.x"].add_(0.5), "weights do not combine to x"),
    ("optimizer.safetensors", lambda t: t.pop(next(k for k in sorted(t) if k.endswith("|exp_avg_sq"))),
     "lacks \\['exp_avg_sq'\\]"),
    ("optimizer.safetensors", lambda t: t.update({k: v[..., :1].clone() for k, v in t.items()
                                                  if k.endswith("|exp_avg") and v.ndim == 2}),
     "must be a tensor of the parameter's shape"),
    ("optimizer.safetensors", lambda t: t.update({next(iter(sorted(t))).split("|")[0] + "|momentum_buffer":
                                                  torch.zeros(1)}), "is not an AdamW state field"),
    ("model.safetensors", lambda t: [v.add_(0.25) for k, v in t.items() if k.endswith(".s")],
     "saved s differ from the Frank-Wolfe iterate"),
    ("model.safetensors", lambda t: next(v for k, v in t.items() if k.endswith(".U")).view(-1).__setitem__(
        0, float("nan")), "model.safetensors holds NaN/Inf"),
])
def test_inconsistent_tensors_are_refused(first_run, tmp_path, name, edit, match):
    cfg, out = _copy(first_run, tmp_path)
    _edit_tensors(out, name, edit, tmp_path)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert _snapshot(out) == before


@pytest.mark.parametrize("edit, match", [
    ("shape", r"fw_avg.safetensors: d must be a finite float vector of shape"),
    ("count", r"fw_avg_n must be an integer >= 1"),
    ("missing", r"fw_avg.safetensors lacks the tensor 'd'"),
])
def test_an_edited_averaged_fw_gradient_is_refused(tmp_path, edit, match):
    """fw_grad_averaging < 1: the checkpoint's d_n (fw_avg group) and its count are checked on resume."""
    from safetensors.torch import save_file
    cfg = tiny_config(tmp_path, max_iterations=2, eval_every=0, fw_grad_averaging=0.5,
                      output_dir=str(tmp_path / "avg"))
    out = train(cfg).output_dir
    ck = os.path.join(out, "checkpoint")
    state = json.load(open(os.path.join(ck, "state.json")))
    assert state["fw_avg_n"] == 2
    if edit == "shape":
        _edit_tensors(out, "fw_avg.safetensors", lambda t: t.update({"d": t["d"][:-1].clone()}), tmp_path)
    elif edit == "count":
        state["fw_avg_n"] = 0
        rewrite(ck, "state.json", json.dumps(state).encode())
    else:
        save_file({"other": torch.zeros(1)}, str(tmp_path / "t.safetensors"))
        rewrite(ck, "fw_avg.safetensors", open(tmp_path / "t.safetensors", "rb").read())
    before = _snapshot(out)
    with pytest.raises(ValueError, match=match):
        train(cfg.replace(resume="auto", max_iterations=3))
    assert _snapshot(out) == before
