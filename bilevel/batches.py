"""An endless iterator over a finite collection of batches (re-shuffles each pass if asked)."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch


class BatchStream:
    """Cycle endlessly through ``source`` (a DataLoader, list of batches, or any re-iterable)."""

    def __init__(self, source: Iterable[Any]):
        self.source = source
        self._it = iter(source)
        self.epoch = 0

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError("BatchStream source is empty: it yields no batch") from None
