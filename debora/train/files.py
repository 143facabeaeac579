"""Checks of a local data file before ``datasets`` reads it, so that an error names the file, the row
and the cause (``datasets`` only says "An error occurred while generating the dataset").

:func:`check_local_file` streams the file once (``.gz`` too) and raises ``ValueError`` for: an empty
file, bytes that are not UTF-8 (with the line), a CSV/TSV without a header or without data rows, a
CSV/TSV row whose number of fields differs from the header's, and a JSON Lines row that is not a JSON
object (with the row and the parser's message). :func:`root_cause` digs the original error out of a
``datasets`` exception chain.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from typing import Iterator, Tuple


def _lines(path: str) -> Iterator[Tuple[int, str]]:
    """``(line number from 1, text)``; ``ValueError`` naming the line for bytes that are not UTF-8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"dataset file {path!r}, line {n}: not valid UTF-8 (byte "
                                 f"{raw[err.start:err.start + 1]!r} at column {err.start + 1}); save the "
                                 "file as UTF-8") from None


def check_local_file(path: str, kind: str, delimiter: str = ",") -> None:
    """Raise ``ValueError`` naming the file, the row and the cause if ``path`` cannot be a dataset of
    ``kind`` (``"csv"`` or ``"json"``)."""
    try:
        if kind == "csv":
            _check_csv(path, delimiter)
        else:
            _check_json(path)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"dataset file {path!r} cannot be read: {err}") from None


def _check_csv(path: str, delimiter: str) -> None:
    header, rows, width = None, 0, None
    text = io.StringIO()
    line_of_row = []
    for n, line in _lines(path):
        text.write(line)
        line_of_row.append(n)
    if not text.getvalue().strip():
        raise ValueError(f"dataset file {path!r} is empty: it needs a header row and at least one data row")
    text.seek(0)
    try:
        reader = csv.reader(text, delimiter=delimiter)
        for record in reader:
            if not record or all(not c.strip() for c in record):
                continue
            if header is None:
                header, width = record, len(record)
                continue
            rows += 1
            if len(record) != width:
                line = line_of_row[min(reader.line_num, len(line_of_row)) - 1]
                raise ValueError(f"dataset file {path!r}, line {line}: {len(record)} fields, but the header "
                                 f"{header} has {width}; quote fields that contain the delimiter "
                                 f"{delimiter!r}")
    except csv.Error as err:
        raise ValueError(f"dataset file {path!r}, line {reader.line_num}: malformed CSV ({err})") from None
    if rows == 0:
        raise ValueError(f"dataset file {path!r} has a header {header} but no data rows")


def _check_json(path: str) -> None:
    lines = list(_lines(path))
    body = "".join(t for _, t in lines)
    if not body.strip():
        raise ValueError(f"dataset file {path!r} is empty: it needs JSON records (one object per line, or a "
                         "list of objects)")
    first = body.lstrip()[:1]
    if first == "[" or (first == "{" and len([t for _, t in lines if t.strip()]) == 1):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as err:
            if first == "[":
                raise ValueError(f"dataset file {path!r}, line {err.lineno}: invalid JSON ({err.msg}, column "
                                 f"{err.colno})") from None
        else:
            if isinstance(data, list) and not data:
                raise ValueError(f"dataset file {path!r} holds an empty list: no records")
            if isinstance(data, list) and not all(isinstance(r, dict) for r in data):
                raise ValueError(f"dataset file {path!r}: every record must be a JSON object")
            return
    rows = 0
    for n, text in lines:
        if not text.strip():
            continue
        try:
            record = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise ValueError(f"dataset file {path!r}, line {n}: invalid JSON ({err.msg}, column {err.colno})"
                             "; each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise ValueError(f"dataset file {path!r}, line {n}: a {type(record).__name__}, not a JSON object")
        rows += 1
    if rows == 0:
        raise ValueError(f"dataset file {path!r} has no records")


def root_cause(err: BaseException) -> BaseException:
    """The innermost error of ``err``'s ``__cause__``/``__context__`` chain."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            break
        err = nxt
    return err
