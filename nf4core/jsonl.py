"""Training data in JSONL: one record per line, in any shape nf4core.data_formats knows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import data_formats
from .errors import ModelLoadError
from .regular_file import check_regular_file

MAX_LINE_BYTES = 10 << 20  # one record, its newline included
_BLANK = object()


class DataFormatError(ModelLoadError):
    """A data file has a line that is not a record of a known shape (`file:line: problem`)."""


@dataclass(frozen=True)
class Record:
    """One training example: kind is "text", "completion" or "chat" (fields as
    nf4core.data_formats maps them); format is the shape it was written in."""

    kind: str
    fields: dict
    where: str  # "file:line" or "file: record N", for messages about this record
    format: str = ""


def _parse(raw: bytes, lineno: int) -> tuple[object, str | None]:
    """(JSON value, None), (None, what is wrong), or (_BLANK, None) for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc.reason})"
    if not line.strip():
        return _BLANK, None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    return value, None


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _text_problem(fields: dict) -> str | None:
    """What is wrong with the record's strings: a lone surrogate (a `\\ud800` escape with no pair)
    is valid JSON but not text, and no tokenizer takes it."""
    for text in _strings(fields):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"a string holds a lone surrogate ({text[exc.start]!r} at character "
                f"{exc.start}), which is not text"
            )
    return None


def to_record(value: object, where: str, data_format: str = "auto") -> Record:
    """The record a parsed value stands for (nf4core.data_formats); RecordShapeError otherwise."""
    kind, fields, fmt = data_formats.to_record(value, data_format)
    problem = _text_problem(fields)
    if problem:
        raise data_formats.RecordShapeError(problem)
    return Record(kind, fields, where, fmt)


def read_jsonl(
    path: str | os.PathLike, skip_bad_lines: bool = False, data_format: str = "auto"
) -> tuple[list[Record], int]:
    """The records of a JSONL file and the number of bad lines skipped.

    Blank lines are ignored. A bad line raises DataFormatError naming `file:line`, unless
    `skip_bad_lines`, in which case it is counted and left out.
    """
    path = Path(path)
    records: list[Record] = []
    skipped = 0
    if path.exists():
        check_regular_file(path, DataFormatError)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:  # refused before it is decoded, parsed or tokenized
                raise DataFormatError(
                    f"{where}: the line is longer than "
                    f"{MAX_LINE_BYTES >> 20} MiB, the limit of one record"
                )
            value, problem = _parse(raw, lineno)
            if value is _BLANK:
                continue
            if problem is None:
                try:
                    records.append(to_record(value, where, data_format))
                except data_formats.RecordShapeError as exc:
                    problem = str(exc)
            if problem is None:
                continue
            if skip_bad_lines:
                skipped += 1
            else:
                raise DataFormatError(f"{where}: {problem}")
    if not records:
        raise DataFormatError(
            f"{path}: no usable records" + (f" ({skipped} bad lines skipped)" if skipped else "")
        )
    return records, skipped
