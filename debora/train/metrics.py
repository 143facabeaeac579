"""Metrics as JSON lines: one object per record, ``{"kind": "train"|"eval"|..., "iteration": n, ...}``."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _clean(value.item())
    return value


class MetricsWriter:
    """Append records to ``path``; on resume, records after the checkpoint's iteration are dropped."""

    def __init__(self, path: str, resume_iteration: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_iteration is None:
            open(path, "w").close()
        else:
            kept = [r for r in read_metrics(path) if r.get("iteration", 0) <= resume_iteration
                    and not (r.get("kind") == "end")]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in kept:
                    fh.write(json.dumps(r) + "\n")
            os.replace(tmp, path)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> Dict[str, Any]:
        record = {"kind": kind, **_clean(fields)}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        return record

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_metrics(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, "r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
    return out


def iter_kind(records: List[Dict[str, Any]], kind: str) -> Iterator[Dict[str, Any]]:
    return (r for r in records if r.get("kind") == kind)
