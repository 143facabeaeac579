"""Adapter files: the JSON config is covered by its own checksum (scaling, ranks, basis), scaling must
agree with alpha/init_rank, and NaN/Inf or negative s are refused on load, before the model is
touched; format version 1 files (no config checksum) still load."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import debora
from debora.io import _config_digest
from test_debora_io import _bert_adapted, _untouched, tiny_bert


@pytest.fixture()
def saved(tmp_path):
    model = _bert_adapted("euclidean")
    path = tmp_path / "a"
    debora.save_pretrained(model, str(path))
    return model, path


def _meta(path):
    return json.load(open(path / "debora_config.json"))


def _write_meta(path, meta, rehash=True):
    if rehash:
        meta["config_sha256"] = _config_digest(meta)
    json.dump(meta, open(path / "debora_config.json", "w"))


def _load_fresh(path):
    fresh = tiny_bert()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    return fresh, before


def test_config_checksum_covers_scaling(saved):
    _, path = saved
    meta = _meta(path)
    assert meta["format_version"] == 3 and meta["config_sha256"] == _config_digest(meta)
    name = next(iter(meta["layers"]))
    meta["layers"][name]["scaling"] *= 10
    _write_meta(path, meta, rehash=False)
    fresh, before = _load_fresh(path)
    with pytest.raises(ValueError, match="does not match its own checksum \\(config_sha256\\)"):
        debora.from_pretrained(fresh, str(path))
    assert _untouched(fresh, before)


@pytest.mark.parametrize("scaling", [80.0, float("nan"), -1.0, "2"])
def test_scaling_must_match_the_config_even_when_rehashed(saved, scaling):
    _, path = saved
    meta = _meta(path)
    name = next(iter(meta["layers"]))
    meta["layers"][name]["scaling"] = scaling
    _write_meta(path, meta)
    fresh, before = _load_fresh(path)
    with pytest.raises(ValueError, match=f"adapter layer '{name}' has scaling="):
        debora.from_pretrained(fresh, str(path))
    assert _untouched(fresh, before)


def _edit_weights(path, fn):
    w = path / "adapter_model.safetensors"
    tensors = load_file(str(w))
    fn(tensors)
    save_file(tensors, str(w), metadata={"format": "debora-adapter", "format_version": "2"})
    meta = _meta(path)
    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    _write_meta(path, meta)


@pytest.mark.parametrize("value, match", [(float("nan"), "NaN/Inf"), (float("inf"), "NaN/Inf"),
                                          (-0.5, "negative rank weights s")])
def test_bad_s_is_refused(saved, value, match):
    _, path = saved
    key = next(k for k in load_file(str(path / "adapter_model.safetensors")) if k.endswith(".s"))

    def poison(t):
        t[key][0] = value

    _edit_weights(path, poison)
    fresh, before = _load_fresh(path)
    with pytest.raises(ValueError, match=match):
        debora.from_pretrained(fresh, str(path))
    assert _untouched(fresh, before)


def test_nan_in_a_basis_is_refused(saved):
    _, path = saved
    key = next(k for k in load_file(str(path / "adapter_model.safetensors")) if k.endswith(".U"))

    def poison(t):
        t[key].view(-1)[3] = float("nan")

    _edit_weights(path, poison)
    fresh, before = _load_fresh(path)
    with pytest.raises(ValueError, match=f"NaN/Inf values in 1 tensors \\(e.g. \\['{key}'\\]"):
        debora.from_pretrained(fresh, str(path))
    assert _untouched(fresh, before)


def test_format_version_2_still_loads(saved):
    """Version 2 had no BatchNorm statistics (field ``batchnorm``): read as "none saved"."""
    model, path = saved
    meta = _meta(path)
    del meta["batchnorm"]
    meta["format_version"] = 2
    _write_meta(path, meta)
    loaded = debora.from_pretrained(tiny_bert(), str(path)).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_format_version_1_still_loads(saved):
    model, path = saved
    meta = _meta(path)
    del meta["config_sha256"]
    meta["format_version"] = 1
    json.dump(meta, open(path / "debora_config.json", "w"))
    loaded = debora.from_pretrained(tiny_bert(), str(path))
    ids = torch.tensor([[1, 5, 7, 2]])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert os.path.isfile(path / "adapter_model.safetensors")
