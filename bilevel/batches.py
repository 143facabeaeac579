"""An endless iterator over a finite, re-iterable collection of batches."""
from __future__ import annotations

from typing import Any, Iterable


class BatchStream:
    """Cycle endlessly through ``source`` (a DataLoader, a list of batches, any re-iterable).

    Each pass calls ``iter(source)`` again, so a ``DataLoader(shuffle=True)`` re-shuffles every epoch;
    ``epoch`` counts the completed passes. Stochastic estimators draw independent batches from it::

        est(problem, x, y, upper_batch, bilevel.BatchStream(lower_loader))
    """

    def __init__(self, source: Iterable[Any]):
        if not hasattr(source, "__iter__"):
            raise TypeError(f"BatchStream needs a re-iterable source (list, DataLoader), got "
                            f"{type(source).__name__}")
        self.source = source
        self._one_shot = iter(source) is source   # a generator/iterator cannot be restarted
        self._it = iter(source)
        self.epoch = 0

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            pass
        if self._one_shot:
            raise ValueError("BatchStream source is a one-shot iterator (e.g. a generator) and is "
                             "exhausted; pass a re-iterable such as a list of batches or a DataLoader")
        self.epoch += 1
        self._it = iter(self.source)
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError("BatchStream source is empty: it yields no batch") from None
