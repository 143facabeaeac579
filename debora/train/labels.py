"""Class labels: raw label values → contiguous class indices 0..K-1, with their names kept.

    lm = LabelMap.fit(values, source="reviews.csv", column="stars")   # refuses unusable label columns
    y = lm.encode(values)                                             # int64 class indices
    lm.names                                                          # index -> original value (str)

Values are never used as indices directly: ``{3, 1000000}`` are two classes, ``"1"`` and ``1`` the
same class, ``True`` the class ``"1"``. Order: numbers by value, texts alphabetically.

:meth:`LabelMap.fit` refuses, with a ``ValueError`` naming the source, the column and the fix:

* rows without a label (``None``, NaN, empty text);
* non-integer numbers (a regression target, not classes);
* numbers mixed with text (``"pos"`` next to ``0``/``1``);
* a single class (nothing to classify);
* more distinct values than ``max_class_fraction`` of the rows (default 1/2), unless
  ``allow_many_classes``: such a column is an ID or free text (e.g. swapped text and label columns),
  not class labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_CLASS_FRACTION = 0.5


def _show(values: Sequence[Any], k: int = 3) -> str:
    out = [repr(v) if not isinstance(v, str) or len(v) <= 30 else repr(v[:27] + "...") for v in values[:k]]
    return ", ".join(out) + (", ..." if len(values) > k else "")


def _canon(value: Any) -> Tuple[str, Any]:
    """``(kind, key)``: kind in {"missing", "int", "float", "text"}; equal keys = the same class."""
    if value is None:
        return "missing", None
    if isinstance(value, (bool, np.bool_)):
        return "int", int(value)
    if isinstance(value, (int, np.integer)):
        return "int", int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if math.isnan(f):
            return "missing", None
        if math.isfinite(f) and f.is_integer():
            return "int", int(f)
        return "float", f
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return "missing", None
        try:
            f = float(text)
        except ValueError:
            return "text", value
        if math.isnan(f):
            return "missing", None
        if math.isfinite(f) and f.is_integer():
            return "int", int(f)
        return "float", f
    return "other", value


@dataclass(frozen=True)
class LabelMap:
    """Class index ↔ label value. ``keys[i]`` is the canonical value of class ``i``; ``names[i]`` its
    name (``str``)."""

    keys: Tuple[Any, ...]
    names: Tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.keys)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "LabelMap":
        """A map for a source whose labels are already indices into ``names`` (e.g. a hub ClassLabel)."""
        return cls(keys=tuple(range(len(names))), names=tuple(str(n) for n in names))

    @classmethod
    def fit(cls, values: Sequence[Any], source: str, column: str = "label", *,
            max_class_fraction: float = MAX_CLASS_FRACTION, allow_many_classes: bool = False,
            rows: Optional[Sequence[int]] = None) -> "LabelMap":
        """The classes present in ``values`` (see the module docstring for what is refused); ``rows``:
        the data-row number (from 1) of each value, for messages (default: its position + 1)."""
        vals = list(values)
        where = f"dataset {source!r}, label column {column!r}"
        if not vals:
            raise ValueError(f"{where}: no rows")
        kinds: Dict[str, List[int]] = {}
        keys = []
        for i, v in enumerate(vals):
            kind, key = _canon(v)
            kinds.setdefault(kind, []).append(i)
            keys.append(key)
        if "missing" in kinds:
            bad = [rows[i] if rows is not None else i + 1 for i in kinds["missing"]]
            raise ValueError(f"{where}: {len(bad)} of {len(vals)} rows have no label (rows "
                             f"{', '.join(str(r) for r in bad[:5])}{' ...' if len(bad) > 5 else ''}, "
                             "counting data rows from 1); fill them in or remove those rows")
        if "other" in kinds:
            raise ValueError(f"{where}: labels must be integers or text, got "
                             f"{type(vals[kinds['other'][0]]).__name__} values like "
                             f"{_show([vals[i] for i in kinds['other']])}")
        if "float" in kinds:
            raise ValueError(f"{where}: non-integer numbers such as "
                             f"{_show([vals[i] for i in kinds['float']])} are a regression target, not class "
                             "labels; classification needs integer or text labels")
        if "text" in kinds and "int" in kinds:
            raise ValueError(f"{where}: mixes numbers ({_show(sorted({keys[i] for i in kinds['int']}))}) and "
                             f"text ({_show(sorted({keys[i] for i in kinds['text']}))}) labels; use one kind "
                             "of label for every row")
        uniq = sorted(set(keys))
        n, k = len(vals), len(uniq)
        if k < 2:
            raise ValueError(f"{where}: every row ({n}) has the label {uniq[0]!r}: a single class; "
                             "classification needs at least 2 classes (wrong --label-column?)")
        if not allow_many_classes and k > max(2, max_class_fraction * n):
            raise ValueError(f"{where}: {k} distinct labels in {n} rows (more than {max_class_fraction:g} of "
                             f"the rows, e.g. {_show(uniq)}): this looks like an ID or a text column, not "
                             "class labels; pick the label column with --label-column, or pass "
                             "--allow-many-classes if there really are that many classes")
        return cls(keys=tuple(uniq), names=tuple(str(u) for u in uniq))

    def encode(self, values: Sequence[Any], source: str = "", column: str = "label") -> np.ndarray:
        """Class indices of ``values``; a value outside the map is refused (naming it)."""
        index = {key: i for i, key in enumerate(self.keys)}
        out = np.empty(len(values), dtype=np.int64)
        unknown = []
        for j, v in enumerate(values):
            kind, key = _canon(v)
            i = index.get(key) if kind in ("int", "text") else None
            if i is None:
                unknown.append(v)
            else:
                out[j] = i
        if unknown:
            raise ValueError(f"dataset {source!r}, label column {column!r}: {len(unknown)} labels are not "
                             f"among the training classes {list(self.names)[:8]} (e.g. {_show(unknown)}); "
                             "evaluate on data with the same classes")
        return out

    def counts(self, labels: np.ndarray) -> Dict[str, int]:
        """Examples per class name in the index array ``labels``."""
        c = np.bincount(np.asarray(labels, dtype=np.int64), minlength=self.num_classes)
        return {name: int(c[i]) for i, name in enumerate(self.names)}


def check_classes(labels: np.ndarray, names: Sequence[str], source: str) -> None:
    """Refuse training data whose class indices ``labels`` hold fewer than 2 distinct classes."""
    present = np.unique(np.asarray(labels))
    if len(present) < 2:
        only = names[int(present[0])] if len(present) else None
        raise ValueError(f"dataset {source!r}: every training example has the class {only!r}: a single "
                         "class; classification needs at least 2 classes")
