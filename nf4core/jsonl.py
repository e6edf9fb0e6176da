"""Training data in JSONL: one record per line, `{"text"}`, `{"prompt","completion"}` or `{"messages"}`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .regular_file import check_regular_file

MAX_LINE_BYTES = 10 << 20  # one record, its newline included


class DataFormatError(ModelLoadError):
    """A data file has a line that is not a record of a known shape (`file:line: problem`)."""


@dataclass(frozen=True)
class Record:
    """One training example as written: kind is "text", "completion" or "chat"."""

    kind: str
    fields: dict
    where: str  # "file:line", for messages about this record


def _shape_problem(value: object) -> str | None:
    """None when `value` is a record of a known shape, else what is wrong with it."""
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    if "messages" in value:
        messages = value["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in messages):
            return "'messages' has no assistant message to learn from"
        return None
    if "prompt" in value or "completion" in value:
        if not isinstance(value.get("prompt"), str) or not isinstance(value.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        return None
    if "text" in value:
        return None if isinstance(value["text"], str) else "'text' must be a string"
    return f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {sorted(value)})"


def _parse(raw: bytes, lineno: int) -> tuple[object, str | None]:
    """(record value, None), (None, what is wrong), or (None, None) for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc.reason})"
    if not line.strip():
        return None, None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    return value, _shape_problem(value) or _text_problem(value)


def _text_problem(value: object) -> str | None:
    """What is wrong with the record's strings: a lone surrogate (a `\\ud800` escape with no pair)
    is valid JSON but not text, and no tokenizer takes it."""
    strings = [value] if isinstance(value, str) else []
    if isinstance(value, dict):
        strings = [v for v in value.values() if isinstance(v, str)]
        if isinstance(value.get("messages"), list):
            strings += [m[k] for m in value["messages"] for k in ("role", "content")]
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"a string holds a lone surrogate ({text[exc.start]!r} at character "
                f"{exc.start}), which is not text"
            )
    return None


def _kind(value: dict) -> str:
    return "chat" if "messages" in value else "completion" if "prompt" in value else "text"


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[list[Record], int]:
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
            if value is None and problem is None:  # a blank line
                continue
            if problem is None:
                records.append(Record(_kind(value), value, where))
            elif skip_bad_lines:
                skipped += 1
            else:
                raise DataFormatError(f"{where}: {problem}")
    if not records:
        raise DataFormatError(
            f"{path}: no usable records" + (f" ({skipped} bad lines skipped)" if skipped else "")
        )
    return records, skipped
