"""Helpers for the trainer tests: a tiny random BERT + tokenizer saved locally, and a tiny sentiment csv.

Also checks the helpers themselves (loadable through the trainer's model/data code).
"""
from __future__ import annotations

import csv
import os
import random

import pytest
import torch

POS = ["good", "great", "fine", "nice", "love", "superb", "fun"]
NEG = ["bad", "awful", "poor", "hate", "worst", "dull", "boring"]
FILL = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "and", "it", "this", "very", "so"]


def make_tiny_model(path: str, num_labels: int = 2) -> str:
    """A 2-layer BERT (hidden 32) with random weights and a word-level tokenizer, saved at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    ids = {w: i for i, w in enumerate(vocab)}
    core = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_dataset(path: str, n: int = 240, seed: int = 0, text_col: str = "sentence",
                 label_col: str = "sentiment") -> str:
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([text_col, label_col])
        for i in range(n):
            y = i % 2
            words = [rng.choice(FILL) for _ in range(rng.randint(3, 7))]
            words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
            w.writerow([" ".join(words), "pos" if y else "neg"])
    return path


def tiny_config(tmp_path, **overrides):
    from debora.train import TrainConfig
    model_dir = str(tmp_path / "tiny_bert")
    if not os.path.isdir(model_dir):
        make_tiny_model(model_dir)
    data = str(tmp_path / "data.csv")
    if not os.path.isfile(data):
        make_dataset(data)
    values = dict(model=model_dir, dataset=data, text_column="sentence", label_column="sentiment",
                  init_rank=4, tau=4.0, eps=1e-3, lr=3e-2, epochs=10.0, batch_size=16, max_length=16,
                  eval_every=5, output_dir=str(tmp_path / "run"), progress=False, plots=False,
                  truncate_from=5, seed=0, device="cpu",
                  # the algorithm these tests were written for (the paper's, with the D1/D2 halves);
                  # test_rank_selection.py covers the default regime
                  estimator="debora-closed-form", budget="global", basis="euclidean", split="halves",
                  fw_step="short", fw_lipschitz=10.0, init_s=None, target_rank=None,
                  # ... whose upper level moves s (Frank-Wolfe) and whose budget removes the smallest s:
                  # the bilevel preset's selection, not the round-12 default's (s held, SVD cut)
                  fw_step_size=0.05, prune_by="s", svd_allocation="sigma", refold_magnitudes="off",
                  # ... with its constant lr: a run cut by max_iterations then resumed with a larger one
                  # is the uninterrupted run only if the lr does not depend on the planned length
                  lr_schedule="constant")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and the test machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_helpers_load(tmp_path):
    from debora.train.data import load_text, tokenize
    from debora.train.models import default_targets, load_text_model
    cfg = tiny_config(tmp_path)
    raw = load_text(cfg)
    assert len(raw) == 240 and raw.label_names == ["neg", "pos"]
    tok, model, _ = load_text_model(cfg.model, 2)
    ex = tokenize(raw, tok, 16)
    assert len(ex) == 240 and ex.features[0]["input_ids"][0] == tok.cls_token_id
    targets = default_targets(model, "text")
    assert len(targets) == 2 * 6 and all("classifier" not in t and "pooler" not in t for t in targets)


def test_column_guessing_and_pairs(tmp_path):
    import json
    from debora.train import TrainConfig
    from debora.train.data import load_text
    rows = [{"question": f"q{i}", "sentence": f"s{i}", "label": i % 2} for i in range(6)]
    path = tmp_path / "qnli.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    raw = load_text(TrainConfig(dataset=str(path)))
    assert raw.texts[0] == "q0" and raw.pairs[0] == "s0" and list(raw.labels) == [0, 1, 0, 1, 0, 1]
    raw = load_text(TrainConfig(dataset=str(path), text_column="sentence"))
    assert raw.texts[0] == "s0" and raw.pairs is None


def write_fake_fashion_mnist(directory, train: int, test: int) -> None:
    """Random 28×28 images with labels 0..9 cycling, in Fashion-MNIST's gzipped IDX files."""
    import gzip
    import numpy as np

    def idx(path, arr):
        header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_reader(tmp_path, monkeypatch):
    from debora.train import TrainConfig
    from debora.train.data import collate, image_examples, load_images

    write_fake_fashion_mnist(tmp_path, train=20, test=8)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    raw = load_images(TrainConfig(dataset="fashion-mnist"))
    assert raw.images.shape == (20, 28, 28) and len(raw.eval) == 8 and raw.labels[13] == 3
    batch = collate(image_examples(raw), [0, 5, 7], image_size=40)
    assert batch["pixel_values"].shape == (3, 3, 40, 40) and batch["labels"].tolist() == [0, 5, 7]
