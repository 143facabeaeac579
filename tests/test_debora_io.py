"""save_pretrained / from_pretrained round trip, refusal of bad files, PEFT export."""
import json
import os

import pytest
import torch
from torch import nn

import debora
from test_debora_inject import SmallCNN, tiny_bert, tiny_gpt2


def _train_a_bit(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in debora.lower_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for p in debora.upper_parameters(model).values():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + debora.get_config(model).eps)
    debora.retract(model)


def _bert_adapted(basis="euclidean"):
    model = tiny_bert()
    debora.inject(model, debora.DeboraConfig(target_modules=["query", "value", "dense"], init_rank=4,
                                             basis=basis, modules_to_save=["classifier"], eps=1e-2))
    _train_a_bit(model)
    with torch.no_grad():
        layers = debora.adapter_layers(model)
        list(layers.values())[0].s[:3] = 1e-2            # truncate to different per-layer ranks
        list(layers.values())[1].s[:] = 1e-2             # one layer at rank 0
    debora.truncate(model)
    return model


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("basis", ["euclidean", "oblique"])
def test_save_load_round_trip_is_bit_exact(tmp_path, basis):
    model = _bert_adapted(basis)
    out = model(input_ids=IDS).logits
    debora.save_pretrained(model, str(tmp_path))
    meta = json.load(open(tmp_path / "debora_config.json"))
    ranks = {k: v["rank"] for k, v in meta["layers"].items()}
    assert meta["format_version"] == 3 and ranks["bert.encoder.layer.0.attention.self.query"] == 1
    assert ranks["bert.encoder.layer.0.attention.self.value"] == 0
    assert ranks["bert.encoder.layer.1.attention.self.value"] == 4
    loaded = debora.from_pretrained(tiny_bert(), str(tmp_path))
    assert debora.rank_pattern(loaded) == debora.rank_pattern(model)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(loaded(input_ids=IDS).logits, out)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(debora.lower_parameters(loaded))


def test_read_adapter_returns_the_saved_tensors_and_refuses_a_corrupted_file(tmp_path):
    model = _bert_adapted("oblique")
    debora.save_pretrained(model, str(tmp_path))
    meta, tensors = debora.read_adapter(str(tmp_path))
    assert meta["layers"]["bert.encoder.layer.0.attention.self.value"]["rank"] == 0
    sd = model.state_dict()
    assert set(tensors) == set(meta["tensors"])
    s_name = "bert.encoder.layer.0.attention.self.query.s"
    assert torch.equal(tensors[s_name], sd[s_name])
    weights = tmp_path / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        debora.read_adapter(str(tmp_path))


def test_cnn_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    debora.inject(model, debora.DeboraConfig(target_modules=["features.0", "features.2"], init_rank=2,
                                             basis="stiefel", modules_to_save=["classifier"]))
    _train_a_bit(model)
    x = torch.randn(2, 3, 8, 8)
    debora.save_pretrained(model, str(tmp_path))
    torch.manual_seed(0)
    loaded = debora.from_pretrained(SmallCNN(), str(tmp_path))
    assert torch.equal(loaded(x), model(x))


class BatchNormCNN(nn.Module):
    """Conv → BatchNorm → ReLU → Conv → BatchNorm (its head a Linear with its own BatchNorm1d)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=0.01))
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 4))

    def forward(self, pixel_values):
        return self.head(self.features(pixel_values).mean((2, 3)))


def _bn_model():
    torch.manual_seed(0)
    model = BatchNormCNN()
    debora.inject(model, debora.DeboraConfig(target_modules=["features.0", "features.3"], init_rank=2,
                                             basis="oblique", modules_to_save=["head"]))
    _train_a_bit(model)
    model.train()
    with torch.no_grad():                  # training moves the running statistics away from the base's
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 3 + 1)
    return model.eval()


def test_batchnorm_statistics_travel_with_the_adapter(tmp_path):
    """A CNN's outputs in eval mode depend on BatchNorm's running statistics, which fine-tuning changes:
    format 3 saves them, so the loaded model gives the saved model's outputs bit for bit (without them
    it would not: checked on the fresh base)."""
    model = _bn_model()
    x = torch.randn(4, 3, 8, 8)
    out = model(x)
    debora.save_pretrained(model, str(tmp_path))
    meta = json.load(open(tmp_path / "debora_config.json"))
    assert meta["format_version"] == 3
    assert meta["batchnorm"] == ["features.1", "features.4"]          # head.0: in modules_to_save
    torch.manual_seed(0)
    fresh = BatchNormCNN()
    torch.manual_seed(0)
    loaded = debora.from_pretrained(BatchNormCNN(), str(tmp_path)).eval()
    assert torch.equal(loaded(x), out)
    for name in ("features.1", "features.4", "head.0"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) > 0
        assert not torch.equal(a.running_mean, fresh.get_submodule(name).running_mean)


def test_bad_batchnorm_statistics_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _bn_model()
    debora.save_pretrained(model, str(tmp_path / "a"))

    class NoBN(BatchNormCNN):
        def __init__(self):
            super().__init__()
            self.features[1] = nn.Identity()

    with pytest.raises(ValueError, match="BatchNorm layer 'features.1' of the adapter is a Identity, not a BatchNorm"):
        debora.from_pretrained(NoBN(), str(tmp_path / "a"))
    # a negative running variance, written with consistent checksums (as an attacker or a bug would)
    w = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    w["features.4.running_var"][0] = -1.0
    save_file(w, str(tmp_path / "a" / "adapter_model.safetensors"))
    meta = json.load(open(tmp_path / "a" / "debora_config.json"))
    from debora.io import _config_digest, _sha256
    meta["weights_sha256"] = _sha256(str(tmp_path / "a" / "adapter_model.safetensors"))
    meta["config_sha256"] = _config_digest(meta)
    json.dump(meta, open(tmp_path / "a" / "debora_config.json", "w"))
    base = BatchNormCNN()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="negative running variances"):
        debora.from_pretrained(base, str(tmp_path / "a"))
    assert _untouched(base, before)


def _untouched(model, before):
    assert not debora.adapter_layers(model)
    sd = model.state_dict()
    return set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)


def test_bad_files_and_wrong_base_fail_cleanly(tmp_path):
    model = _bert_adapted("oblique")
    good = tmp_path / "good"
    debora.save_pretrained(model, str(good))
    fresh = tiny_bert()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(good):
            (d / f).write_bytes((good / f).read_bytes())
        edit(d)
        return str(d)

    def flip(d):
        p = d / "adapter_model.safetensors"
        b = bytearray(p.read_bytes())
        b[-3] ^= 0xFF
        p.write_bytes(bytes(b))

    def truncate_file(d):
        p = d / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[:100])

    def version(d):
        m = json.load(open(d / "debora_config.json"))
        m["format_version"] = 99
        json.dump(m, open(d / "debora_config.json", "w"))

    def bad_json(d):
        (d / "debora_config.json").write_text("{not json")

    cases = {"flip": (flip, "checksum"), "trunc": (truncate_file, "checksum"),
             "version": (version, "format_version=99"), "json": (bad_json, "not valid JSON")}
    for name, (edit, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            debora.from_pretrained(fresh, variant(name, edit))
        assert _untouched(fresh, before)
    with pytest.raises(ValueError, match="does not exist"):
        debora.from_pretrained(fresh, str(tmp_path / "nowhere"))
    # wrong base models: other width, other architecture
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    wide = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24,
                                                    num_labels=3))
    wide_before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match="wrong base model"):
        debora.from_pretrained(wide, str(good))
    assert _untouched(wide, wide_before)
    gpt = tiny_gpt2()
    with pytest.raises(ValueError, match="wrong base model"):
        debora.from_pretrained(gpt, str(good))
    assert not debora.adapter_layers(gpt)


def _peft_outputs(peft_base, path, **inputs):
    import peft
    pm = peft.PeftModel.from_pretrained(peft_base, path).eval()
    with torch.no_grad():
        return pm(**inputs)


@pytest.mark.parametrize("basis", ["euclidean", "oblique"])
def test_export_peft_bert_linear(tmp_path, basis):
    model = _bert_adapted(basis).eval()
    info = debora.export_peft(model, str(tmp_path))
    assert "bert.encoder.layer.1.attention.self.value" in info["exported"]
    assert info["skipped_rank0"] == ([list(debora.adapter_layers(model))[1]] if basis == "euclidean" else [])
    ours = model(input_ids=IDS).logits
    theirs = _peft_outputs(tiny_bert(), str(tmp_path), input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_export_peft_gpt2_conv1d(tmp_path):
    model = tiny_gpt2()
    debora.inject(model, debora.DeboraConfig(target_modules=["c_attn", "c_proj", "c_fc"], init_rank=3,
                                             basis="stiefel"))
    _train_a_bit(model)
    ids = IDS % 40
    debora.export_peft(model, str(tmp_path))
    theirs = _peft_outputs(tiny_gpt2(), str(tmp_path), input_ids=ids).logits
    assert (model(input_ids=ids).logits - theirs).abs().max() <= 1e-5


def test_export_peft_cp_conv_and_dilated_refused(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    debora.inject(model, debora.DeboraConfig(target_modules=["features.0", "features.2"], init_rank=2,
                                             modules_to_save=["classifier"]))
    _train_a_bit(model)
    x = torch.randn(2, 3, 8, 8)
    debora.export_peft(model, str(tmp_path / "cnn"))
    torch.manual_seed(0)
    theirs = _peft_outputs(SmallCNN(), str(tmp_path / "cnn"), pixel_values=x)
    assert (model(x) - theirs).abs().max() <= 1e-5
    dil = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    debora.inject(dil, debora.DeboraConfig(target_modules=["0"], init_rank=2))
    with pytest.raises(ValueError, match="dilation"):
        debora.export_peft(dil, str(tmp_path / "dil"))


def test_merge_and_unload_on_bert():
    model = _bert_adapted("stiefel")
    out = model(input_ids=IDS).logits
    merged = debora.merge_and_unload(model)
    assert not debora.adapter_layers(merged)
    assert isinstance(merged.bert.encoder.layer[0].attention.self.query, nn.Linear)
    torch.testing.assert_close(merged(input_ids=IDS).logits, out, atol=1e-5, rtol=1e-5)
