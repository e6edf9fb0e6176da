"""The safetensors format read and written by hand: numpy has no bfloat16, and we stream.

Layout: u64 little-endian header length N, N bytes of JSON `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the tensor bytes (offsets are
relative to the end of the header). The reader maps one tensor at a time; the writer appends one
tensor at a time to a data file and only then writes the header in front of it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_file, os_errors_name
from ..dtypes import bfloat16
from ..errors import ModelLoadError
from ..regular_file import check_regular_file

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": bfloat16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A safetensors file, opened lazily: the header is parsed, tensors are mapped on `read`.

    The header is checked as strictly as the reference reader does: every entry has a known dtype,
    a shape and offsets of non-negative integers, a byte size that matches dtype and shape, and the
    entries, sorted by offset, tile the data exactly (no overlap, no gap, nothing after the last).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_regular_file(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._error("too short to be a safetensors file")
                (n,) = struct.unpack("<Q", prefix)
                if n > min(size - 8, _MAX_HEADER):
                    raise self._error(f"header length {n} does not fit in the file ({size} bytes)")
                raw = f.read(n)
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._error(f"header is not valid JSON: {exc}") from None
        except RecursionError:
            raise self._error("header is not valid JSON: nested too deeply") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        strings = isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        )
        if not strings:
            raise self._error("__metadata__ must be an object of strings")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            dtype, shape, begin, end = self._check_entry(name, entry)
            self._entries[name] = dtype, shape, begin
            spans.append((begin, end, name))
        self._check_tiling(spans, size - self._data_start)

    def _error(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {problem}")

    def _check_entry(self, name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        bad = self._error(
            f"tensor {name!r} has a malformed or unsupported header entry: {_short(entry)}"
        )
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise bad
        dtype = DTYPES.get(entry["dtype"])
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None or not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise bad
        begin, end = offsets
        if begin > end:
            raise self._error(
                f"tensor {name!r}: data_offsets [{begin}, {end}] end before they begin"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise self._error(
                f"tensor {name!r}: {end - begin} bytes do not hold shape "
                f"{list(shape)} of {entry['dtype']}"
            )
        return dtype, tuple(shape), begin, end

    def _check_tiling(self, spans: list[tuple[int, int, str]], data_size: int) -> None:
        """Sorted by offset, each tensor starts where the previous one ended; the last one ends
        the file."""
        position, previous = 0, None
        for begin, end, name in sorted(spans):
            if begin != position:
                if begin < position:
                    what = f"overlaps tensor {previous!r}"
                elif previous is None:
                    what = f"start at byte {begin}: the data must start with a tensor"
                else:
                    what = f"leave a gap of {begin - position} bytes after tensor {previous!r}"
                raise self._error(f"tensor {name!r}: data_offsets [{begin}, {end}] {what}")
            position, previous = end, name
        if position > data_size:
            raise self._error(
                f"tensor {previous!r}: offsets end at byte {position}, past the data "
                f"({data_size} bytes); the file is truncated or corrupt"
            )
        if position < data_size:
            raise self._error(
                f"{data_size - position} bytes after the last tensor belong to none "
                "(offsets do not cover the data)"
            )

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def _entry(self, name: str):
        if name not in self._entries:
            raise ModelLoadError(f"{self.path}: no tensor named {name!r}")
        return self._entries[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only array mapped from the file (pages load as they are touched)."""
        dtype, shape, begin = self._entry(name)
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(
            self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape
        ).view(np.ndarray)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _int_list(value: object) -> bool:
    """A list of non-negative ints (not bools, not floats such as 2.0)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, atomically (nothing appears until `close`).

    Tensor bytes go to a temporary data file as they come; `close` writes the header and copies
    the data behind it into a temporary sibling of the target, then renames it into place.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._data = tempfile.NamedTemporaryFile(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".data", delete=True
        )

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._header or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is used twice")
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {array.dtype} cannot be stored in safetensors")
        array = array.astype(dtype, copy=False)
        with os_errors_name(self.path):
            self._data.write(array.reshape(-1).view(np.uint8).data)  # no copy of the tensor's bytes
        end = self._offset + array.nbytes
        self._header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [self._offset, end],
        }
        self._offset = end

    def close(self) -> None:
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._data.flush()
        self._data.seek(0)
        try:
            with atomic_file(self.path) as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                shutil.copyfileobj(self._data, out, 1 << 20)  # 1 MiB at a time
        finally:
            self._data.close()

    def abort(self) -> None:
        self._data.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    with SafetensorsWriter(path, metadata) as writer:
        for name, array in tensors.items():
            writer.add(name, array)
