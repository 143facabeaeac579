"""Splits and batch order.

* :func:`make_splits` — the held-out evaluation split (never used for training), an optional cap on
  the training pool, and the bilevel split of the pool into D1 (upper level, hypergradients) and D2
  (lower level, bases and head): random equal halves, stratified by label (paper), or D1 = D2.
* :class:`Sampler` — an endless, resumable stream of index batches: epoch ``e`` is the permutation
  drawn from ``seed`` and ``e``, so the position ``(epoch, offset)`` is all a checkpoint needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn without replacement, class proportions preserved (largest remainder)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return rng.permutation(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    rest = n - take.sum()
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:rest]] += 1
    picked = [rng.permutation(np.nonzero(labels == c)[0])[:k] for c, k in zip(classes, take)]
    return rng.permutation(np.concatenate(picked))


def stratified_halves(labels: np.ndarray, rng: np.random.Generator):
    """Two disjoint halves (sizes differ by at most one per class), each class split evenly."""
    labels = np.asarray(labels)
    a, b = [], []
    flip = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        h = len(idx) // 2
        if len(idx) % 2:                       # alternate which half gets the odd one out
            h += flip
            flip ^= 1
        a.append(idx[:h])
        b.append(idx[h:])
    return rng.permutation(np.concatenate(a)), rng.permutation(np.concatenate(b))


@dataclass
class Splits:
    d1: np.ndarray          # indices into the training pool (upper level)
    d2: np.ndarray          # indices into the training pool (lower level)
    pool: np.ndarray        # indices into the source's training data
    eval: np.ndarray        # indices into the evaluation source (the given eval split, or the held-out part)
    eval_from_source: bool  # True: eval indexes the source's own eval split

    def sizes(self) -> Dict[str, int]:
        return {"D1": int(len(self.d1)), "D2": int(len(self.d2)), "pool": int(len(self.pool)),
                "eval": int(len(self.eval))}


def make_splits(labels: np.ndarray, seed: int, mode: str = "halves", eval_fraction: float = 0.2,
                max_examples: Optional[int] = None, eval_labels: Optional[np.ndarray] = None,
                max_eval_examples: Optional[int] = None) -> Splits:
    """Indices of the evaluation split, the training pool, and D1/D2 (see the module docstring).

    Raises ``ValueError`` when any split would be empty.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    n = len(labels)
    if n == 0:
        raise ValueError("the training data is empty (0 labelled examples); check the dataset and "
                         "its label column")
    if eval_labels is not None and len(eval_labels) > 0:
        ev = np.arange(len(eval_labels))
        if max_eval_examples is not None and len(ev) > max_eval_examples:
            ev = np.sort(stratified_subset(eval_labels, max_eval_examples, rng))
        train_idx = np.arange(n)
        from_source = True
    else:
        n_eval = int(round(n * eval_fraction))
        if n_eval < 1 or n - n_eval < 2:
            raise ValueError(f"cannot hold out an evaluation split from {n} examples with "
                             f"eval_fraction={eval_fraction}: the eval split would have {n_eval} and "
                             f"the training pool {n - n_eval} examples; use more data")
        perm = stratified_subset(labels, n_eval, rng)
        ev = np.sort(perm)
        mask = np.ones(n, dtype=bool)
        mask[ev] = False
        train_idx = np.nonzero(mask)[0]
        if max_eval_examples is not None and len(ev) > max_eval_examples:
            ev = np.sort(ev[stratified_subset(labels[ev], max_eval_examples, rng)])
        from_source = False
    if max_examples is not None and len(train_idx) > max_examples:
        train_idx = np.sort(train_idx[stratified_subset(labels[train_idx], max_examples, rng)])
    pool_labels = labels[train_idx]
    if mode == "halves":
        d1, d2 = stratified_halves(pool_labels, rng)
    elif mode == "same":
        d1 = d2 = rng.permutation(len(train_idx))
    else:
        raise ValueError(f"split={mode!r} is not one of ['halves', 'same']")
    splits = Splits(d1=np.sort(d1), d2=np.sort(d2), pool=train_idx, eval=ev, eval_from_source=from_source)
    for name, size in splits.sizes().items():
        if size == 0:
            raise ValueError(f"split {name} is empty (sizes: {splits.sizes()}); use more examples "
                             "(or --split same for D1 = D2)")
    return splits


class Sampler:
    """Endless batches of indices over ``n`` items; state = (epoch, offset), order from (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError("Sampler over an empty split")
        self.n, self.batch_size, self.seed, self.stream, self.shuffle = n, batch_size, seed, stream, shuffle
        self.epoch, self.offset = 0, 0
        self._perm: Optional[np.ndarray] = None

    def _order(self) -> np.ndarray:
        if self._perm is None:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), self.stream, self.epoch]))
                self._perm = rng.permutation(self.n)
            else:
                self._perm = np.arange(self.n)
        return self._perm

    def next(self) -> List[int]:
        if self.offset >= self.n:
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        order = self._order()
        out = order[self.offset: self.offset + self.batch_size]
        self.offset += len(out)
        return out.tolist()

    @property
    def progress(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.offset / self.n

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None
