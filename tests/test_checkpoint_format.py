"""The checkpoint format: manifest with SHA-256 per file, refusal of every missing or corrupt part
(naming the file), no NaN ever written, leftover temporaries cleaned up, and no code run on load:
only allow-listed state types are rebuilt."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.frank_wolfe.steps import ShortStepState
from debora.train import checkpoint as ckpt


def _write(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {"model": {"a": torch.randn(3, generator=g, dtype=torch.float64)},
               "optimizer": {"a|exp_avg": torch.randn(3, generator=g)},
               "fw": {"fw.x": torch.rand(4, generator=g)}, "rng": {"torch_cpu": torch.get_rng_state()}}
    meta = {"iteration": 3, "fw_layout": {"__tensor__": "fw.x"}}
    return ckpt.save(str(path), tensors, meta)


def rewrite(ck, name, data: bytes):
    """Replace file ``name`` of checkpoint ``ck`` and re-hash it in the manifest (what someone editing a
    checkpoint on purpose would do; checksums catch corruption, the loader must catch the rest)."""
    p = os.path.join(ck, name)
    with open(p, "wb") as fh:
        fh.write(data)
    mpath = os.path.join(ck, ckpt.MANIFEST)
    manifest = json.load(open(mpath))
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    json.dump(manifest, open(mpath, "w"))


def test_round_trip_and_manifest(tmp_path):
    ck = _write(tmp_path / "ck")
    manifest = json.load(open(os.path.join(ck, "manifest.json")))
    assert manifest["format"] == "debora-checkpoint" and manifest["format_version"] == ckpt.FORMAT_VERSION
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "fw.safetensors",
                                      "rng.safetensors", "state.json"}
    for name, entry in manifest["files"].items():
        data = open(os.path.join(ck, name), "rb").read()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    tensors, meta = ckpt.load(ck)
    assert meta["iteration"] == 3 and tensors["model"]["a"].dtype == torch.float64


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "fw.safetensors",
                                  "rng.safetensors", "state.json", "manifest.json"])
def test_missing_file_is_refused_by_name(tmp_path, name):
    ck = _write(tmp_path / "ck")
    os.remove(os.path.join(ck, name))
    with pytest.raises(ValueError, match=f"{name} is missing"):
        ckpt.load(ck)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_flipped_byte_is_refused_by_name(tmp_path, name):
    ck = _write(tmp_path / "ck")
    p = os.path.join(ck, name)
    b = bytearray(open(p, "rb").read())
    b[len(b) // 2] ^= 0x01
    open(p, "wb").write(bytes(b))
    with pytest.raises(ValueError, match=f"{name} does not match its SHA-256"):
        ckpt.load(ck)


def test_truncated_file_is_refused_by_name(tmp_path):
    ck = _write(tmp_path / "ck")
    p = os.path.join(ck, "model.safetensors")
    head = open(p, "rb").read()[:40]
    open(p, "wb").write(head)
    with pytest.raises(ValueError, match="model.safetensors has 40 bytes"):
        ckpt.load(ck)


def test_unlisted_group_and_bad_manifest(tmp_path):
    ck = _write(tmp_path / "ck")
    mpath = os.path.join(ck, "manifest.json")
    manifest = json.load(open(mpath))
    del manifest["files"]["optimizer.safetensors"]
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(ValueError, match="does not list optimizer.safetensors"):
        ckpt.load(ck)
    open(mpath, "w").write("{broken")
    with pytest.raises(ValueError, match="manifest.json: the checkpoint manifest is not valid JSON"):
        ckpt.load(ck)
    json.dump(dict(manifest, format_version=1), open(mpath, "w"))
    with pytest.raises(ValueError, match="format_version=1"):
        ckpt.load(ck)
    json.dump(dict(manifest, files={"../etc": {"sha256": "0", "bytes": 0}}), open(mpath, "w"))
    with pytest.raises(ValueError, match="does not list state.json|invalid file name"):
        ckpt.load(ck)


def test_invalid_state_json_names_the_file(tmp_path):
    ck = _write(tmp_path / "ck")
    rewrite(ck, "state.json", b'{"iteration": 1} {"extra": 2}')
    with pytest.raises(ValueError, match=r"state.json: the checkpoint state is not valid JSON \(Extra data"):
        ckpt.load(ck)
    rewrite(ck, "state.json", b'{"iteration": NaN}')
    with pytest.raises(ValueError, match="state.json.*not valid JSON"):
        ckpt.load(ck)
    rewrite(ck, "state.json", b'[1, 2]')
    with pytest.raises(ValueError, match="state.json must hold a JSON object"):
        ckpt.load(ck)


def test_garbage_safetensors_is_refused_by_name(tmp_path):
    ck = _write(tmp_path / "ck")
    rewrite(ck, "fw.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="fw.safetensors is not a readable safetensors file"):
        ckpt.load(ck)


def test_older_checkpoint_without_manifest_is_refused(tmp_path):
    ck = _write(tmp_path / "ck")
    os.remove(os.path.join(ck, "manifest.json"))
    with pytest.raises(ValueError, match="no manifest: written by an older debora"):
        ckpt.load(ck)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("group", ["model", "optimizer", "fw"])
def test_nonfinite_state_is_never_written(tmp_path, bad, group):
    ck = _write(tmp_path / "ck")
    before = {n: open(os.path.join(ck, n), "rb").read() for n in os.listdir(ck)}
    tensors = {"model": {"a": torch.ones(3)}, "optimizer": {"a|exp_avg": torch.ones(3)},
               "fw": {"fw.x": torch.ones(4)}, "rng": {"torch_cpu": torch.get_rng_state()}}
    tensors[group][next(iter(tensors[group]))][1] = bad
    with pytest.raises(ckpt.NonFiniteCheckpoint, match=f"NaN/Inf values in {group}"):
        ckpt.save(ck, tensors, {"iteration": 4})
    assert {n: open(os.path.join(ck, n), "rb").read() for n in os.listdir(ck)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_nonfinite_meta_is_never_written(tmp_path):
    ck = _write(tmp_path / "ck")
    with pytest.raises(ckpt.NonFiniteCheckpoint, match=r"state.history.eval_loss is NaN/Inf"):
        ckpt.save(ck, {"model": {"a": torch.ones(1)}}, {"history": {"eval_loss": float("nan")}})
    assert ckpt.load(ck)[1]["iteration"] == 3


def test_leftover_temporaries_are_removed(tmp_path):
    ck = _write(tmp_path / "ck")
    for k in range(2):     # what a SIGKILL during two writes leaves behind
        junk = tmp_path / f"ck.tmp-killed{k}"
        junk.mkdir()
        (junk / "model.safetensors").write_bytes(b"partial")
    ckpt.load(ck)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    (tmp_path / "ck.tmp-again").mkdir()
    _write(tmp_path / "ck", seed=1)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# -- no code execution: only allow-listed state types are rebuilt -----------------------------------
PAYLOADS = [
    lambda m: {"__namedtuple__": "subprocess:run", "fields": {"args": f"touch {m}", "shell": True}},
    lambda m: {"__dataclass__": "subprocess:Popen", "fields": {"args": f"touch {m}", "shell": True}},
    lambda m: {"__dataclass__": "os:system", "fields": {"command": f"touch {m}"}},
    lambda m: {"__type__": "subprocess:run", "fields": {"args": f"touch {m}", "shell": True}},
    lambda m: {"__type__": "run", "fields": {"args": f"touch {m}", "shell": True}},
    lambda m: {"__type__": "ShortStepState", "fields": {"lipschitz": 1.0, "prev_x": None, "prev_grad": None,
                                                         "__init__": f"touch {m}"}},
    lambda m: {"__type__": "ShortStepState", "fields": {"lipschitz": 1.0}, "__namedtuple__": "os:system"},
    lambda m: {"__dict__": {"x": {"__namedtuple__": "subprocess:run", "fields": {"args": f"touch {m}",
                                                                                 "shell": True}}}},
    lambda m: {"__list__": [{"__dataclass__": "builtins:eval", "fields": {"source": "1"}}]},
    lambda m: {"__dict_items__": [[{"__namedtuple__": "subprocess:run", "fields": {"args": f"touch {m}"}}, 1]]},
    lambda m: {"__tensor__": "fw.x", "__dataclass__": "os:system"},
]


@pytest.mark.parametrize("k", range(len(PAYLOADS)))
def test_state_layout_payloads_run_nothing(tmp_path, monkeypatch, k):
    marker = tmp_path / "pwned"
    calls = []
    for mod, name in ((subprocess, "run"), (subprocess, "Popen"), (os, "system")):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **kw: calls.append((_n, a, kw)))
    with pytest.raises(ValueError, match="allow-list|not a state layout entry|needs exactly the fields"):
        ckpt.unflatten_state(PAYLOADS[k](marker), {"fw.x": torch.zeros(2)}, where="fw_layout")
    assert not calls and not marker.exists()


def _cli_args(model, data, out):
    return ["train", "--model", model, "--dataset", data, "--text-column", "sentence", "--label-column",
            "sentiment", "--init-rank", "2", "--tau", "2", "--max-iterations", "1", "--batch-size", "8",
            "--max-length", "12", "--output-dir", str(out), "--device", "cpu", "--no-progress",
            "--no-plots", "--target-modules", "query"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from debora.cli import main
    from test_train_tiny import make_dataset, make_tiny_model
    tmp = tmp_path_factory.mktemp("payload")
    model, data = make_tiny_model(str(tmp / "bert")), make_dataset(str(tmp / "d.csv"), n=80)
    out = tmp / "out"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(_cli_args(model, data, out)) == 0
    torch.set_num_threads(n)
    return model, data, out


@pytest.mark.parametrize("k", [0, 1, 3, 5, 7])
def test_resume_with_payload_in_checkpoint_runs_nothing(cli_run, tmp_path, capsys, k):
    """End to end: the issue's exploit (and variants) written into a real checkpoint, manifest
    re-hashed, then ``debora train --resume auto``: refused naming the problem; the command never runs
    (the shell is not monkeypatched here)."""
    import shutil
    from debora.cli import main
    model, data, src = cli_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    ck = str(out / "checkpoint")
    meta = json.load(open(os.path.join(ck, "state.json")))
    marker = tmp_path / "pwned"
    meta["fw_layout"]["__dict__"]["rule_state"] = PAYLOADS[k](marker)
    rewrite(ck, "state.json", json.dumps(meta).encode())
    before = open(out / "metrics.jsonl").read()
    capsys.readouterr()
    assert main(_cli_args(model, data, out) + ["--resume", "auto", "--max-iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert "fw_layout" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    assert open(out / "metrics.jsonl").read() == before


# -- properties of the plain-data encoding ------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
tensors_st = st.builds(lambda n, seed: torch.randn(n, generator=torch.Generator().manual_seed(seed),
                                                   dtype=torch.float64),
                       st.integers(0, 4), st.integers(0, 2**16))
leaves = st.one_of(scalars, tensors_st,
                   st.builds(lambda m: ShortStepState(torch.tensor(m, dtype=torch.float64)),
                             st.floats(0.0, 10.0)))
trees = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.tuples(kids, kids),
    st.dictionaries(st.text(min_size=1, max_size=5), kids, max_size=3),
    st.dictionaries(st.integers(0, 9), kids, max_size=2)), max_leaves=12)


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, ShortStepState):
        return isinstance(b, ShortStepState) and all(_same(getattr(a, f), getattr(b, f))
                                                     for f in ("lipschitz", "prev_x", "prev_grad"))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@given(trees)
def test_flatten_round_trip_through_json(tree):
    tensors = {}
    layout = ckpt.flatten_state(tree, "t", tensors)
    again = ckpt.unflatten_state(json.loads(json.dumps(layout)), tensors)
    assert _same(tree, again)


json_values = st.recursive(st.one_of(scalars, st.sampled_from(["subprocess:run", "os:system",
                                                               "ShortStepState", "fw.x"])),
                           lambda kids: st.one_of(
                               st.lists(kids, max_size=3),
                               st.dictionaries(st.sampled_from(list(ckpt._MARKERS) + [
                                   "fields", "__namedtuple__", "__dataclass__", "x"]), kids, max_size=3)),
                           max_leaves=10)
ALLOWED = (type(None), bool, int, float, str, list, tuple, dict, torch.Tensor, ShortStepState)


def _only_allowed(obj):
    if not isinstance(obj, ALLOWED):
        return False
    if isinstance(obj, dict):
        return all(_only_allowed(k) and _only_allowed(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_only_allowed(v) for v in obj)
    return True


@settings(max_examples=200)
@given(json_values)
def test_any_json_rebuilds_only_plain_data_or_is_refused(layout):
    try:
        out = ckpt.unflatten_state(layout, {"fw.x": torch.zeros(1)})
    except (ValueError, TypeError):
        return      # TypeError: an allow-listed type's own constructor refused its arguments
    assert _only_allowed(out)


def test_unregistered_state_types_are_not_saved():
    from dataclasses import dataclass

    @dataclass
    class Mine:
        a: int

    with pytest.raises(TypeError, match="register it"):
        ckpt.flatten_state({"s": Mine(1)}, "x", {})
    ckpt.register_state_type(Mine, "test-Mine")
    try:
        tensors = {}
        layout = ckpt.flatten_state({"s": Mine(1)}, "x", tensors)
        assert layout["__dict__"]["s"]["__type__"] == "test-Mine"
        assert ckpt.unflatten_state(layout, tensors) == {"s": Mine(1)}
    finally:
        ckpt.STATE_TYPES.pop("test-Mine")
