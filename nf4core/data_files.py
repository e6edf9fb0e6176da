"""Where training data comes from: JSONL, a JSON array, Parquet, Arrow, a directory saved by
`datasets.save_to_disk`, a directory of split files, or a Hugging Face Hub data set id (from the
cache). Parquet and Arrow are read with pyarrow, an optional dependency."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import data_formats, hub
from .jsonl import DataFormatError, Record, read_jsonl, to_record
from .regular_file import check_regular_file

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
VALID_SPLITS = ("validation", "valid", "val", "dev")
DATASETS_FILES = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}


@dataclass(frozen=True)
class DataFiles:
    """The sources of the train split and of the validation split (possibly none)."""

    train: tuple[Path, ...]
    valid: tuple[Path, ...] = ()


def find_data(spec: str | os.PathLike) -> DataFiles:
    """The files a `--data` value names: a file, a directory (split files, or `save_to_disk`'s),
    a Hub cache directory, or a Hub data set id found in the cache."""
    try:
        path = hub.resolve(spec, "dataset").path
    except hub.HubError as e:
        raise DataFormatError(str(e)) from None
    if not path.exists():
        raise DataFormatError(f"{path}: no such data file or directory")
    if not path.is_dir():
        return DataFiles((check_regular_file(path, DataFormatError),))
    if (path / "dataset_dict.json").is_file():
        return _dataset_dict(path)
    if (path / "state.json").is_file():
        return DataFiles((path,))
    return _split_files(path)


def _dataset_dict(path: Path) -> DataFiles:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path / 'dataset_dict.json'}: cannot read its splits ({e})") from e
    if "train" not in splits:
        raise DataFormatError(f"{path}: no 'train' split (splits: {splits})")
    valid = next((s for s in VALID_SPLITS if s in splits), None)
    return DataFiles((path / "train",), (path / valid,) if valid else ())


def _split_of(relative: Path) -> str | None:
    words = set(re.split(r"[-_./\s]+", str(relative.with_suffix("")).lower()))
    if "train" in words:
        return "train"
    if words & set(VALID_SPLITS):
        return "valid"
    return "test" if "test" in words else None


def _split_files(path: Path) -> DataFiles:
    """Data files named by split (train*, validation*/valid*/val*/dev*; test* is not used); a
    single data file of no split is the train split."""
    files = sorted(
        p
        for p in path.rglob("*")
        if p.suffix in SUFFIXES
        and p.name not in DATASETS_FILES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.is_file()
    )
    if not files:
        raise DataFormatError(
            f"{path}: no data files ({', '.join(SUFFIXES)}) in the directory; a data directory "
            "holds train.jsonl (and may hold valid.jsonl), split files, or save_to_disk's output"
        )
    splits = {p: _split_of(p.relative_to(path)) for p in files}
    if len(files) == 1 and splits[files[0]] is None:
        return DataFiles((files[0],))
    unknown = [p for p in files if splits[p] is None]
    if unknown:
        raise DataFormatError(
            f"{unknown[0]}: cannot tell which split this file is (its name says neither train "
            "nor validation); give the file itself as --data"
        )
    train = tuple(p for p in files if splits[p] == "train")
    valid = tuple(p for p in files if splits[p] == "valid")
    if not train:
        raise DataFormatError(f"{path}: no train split (no file named train*)")
    folders = sorted({str(p.parent.relative_to(path)) for p in train})
    if len(folders) > 1:
        raise DataFormatError(
            f"{path}: train files in several folders ({', '.join(folders)}), e.g. several "
            "configurations; give one folder as --data"
        )
    return DataFiles(train, valid)


def read_records(
    sources: str | os.PathLike | tuple[str | os.PathLike, ...] | list,
    skip_bad_lines: bool = False,
    data_format: str = "auto",
) -> tuple[list[Record], int]:
    """The records of one source or several (concatenated), and how many bad ones were skipped."""
    if isinstance(sources, (str, os.PathLike)):
        sources = (sources,)
    records, skipped = [], 0
    for source in sources:
        r, s = _read_one(Path(source), skip_bad_lines, data_format)
        records += r
        skipped += s
    return records, skipped


def _read_one(path: Path, skip_bad_lines: bool, data_format: str) -> tuple[list[Record], int]:
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise DataFormatError(f"{path}: not a data set saved by datasets' save_to_disk")
        rows = _saved_dataset_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix == ".arrow":
        rows = _arrow_rows(path)
    elif path.suffix == ".json" and _starts_with(path, b"["):
        rows = _json_array_rows(path)
    else:
        return read_jsonl(path, skip_bad_lines, data_format)
    records, skipped = [], 0
    for n, value in enumerate(rows, start=1):
        where = f"{path}: record {n}"
        try:
            records.append(to_record(value, where, data_format))
        except data_formats.RecordShapeError as e:
            if not skip_bad_lines:
                raise DataFormatError(f"{where}: {e}") from None
            skipped += 1
    if not records:
        raise DataFormatError(
            f"{path}: no usable records" + (f" ({skipped} bad records skipped)" if skipped else "")
        )
    return records, skipped


def _starts_with(path: Path, prefix: bytes) -> bool:
    check_regular_file(path, DataFormatError)
    try:
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    return head.startswith(prefix)


def _json_array_rows(path: Path) -> list:
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except RecursionError:
        raise DataFormatError(f"{path}: not valid JSON: nested too deeply") from None
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    return value


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataFormatError(
            f"{path}: reading Parquet and Arrow data needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow


def _parquet_rows(path: Path) -> Iterator[dict]:
    pa = _pyarrow(path)
    check_regular_file(path, DataFormatError)
    try:
        table = pa.parquet.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(f"{path}: not a readable Parquet file ({e})") from None
    return iter(table.to_pylist())


def _arrow_rows(path: Path) -> Iterator[dict]:
    """An Arrow IPC stream (what `datasets` writes) or file."""
    pa = _pyarrow(path)
    check_regular_file(path, DataFormatError)
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(f"{path}: not a readable Arrow file ({e})") from None
    return iter(table.to_pylist())


def _saved_dataset_rows(path: Path) -> Iterator[dict]:
    state_path = path / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{state_path}: cannot read its data files ({e})") from None
    for name in names:
        if Path(name).name != name:
            raise DataFormatError(f"{state_path}: data file {name!r} is not in {path}")
        yield from _arrow_rows(path / name)
