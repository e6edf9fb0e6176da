"""Export any model we read (Hugging Face, GGUF, bitsandbytes or our NF4 directory), optionally
with an adapter merged in, as a dense Hugging Face directory (what transformers and mlx-lm load) or
a GGUF file (what llama.cpp loads).

NF4 weights are dequantized to the requested dtype. With an adapter, the weights are those `merge`
writes (the adapter folded into the NF4 base it was trained on). The output is built under a
temporary name and renamed into place; an existing OUT is moved aside only with `overwrite`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import nf4core
from nf4core.dtypes import FLOAT_DTYPES
from nf4core.gguf_write import GGUF_DTYPES, tokenizer_metadata, write_gguf

from .hf_dir_writer import write_hf_dir
from .merge import MergedSource
from .peft_adapter import Adapter, check_adapter_fits
from .run_dir import check_not_locked, move_aside

FORMATS = ("hf", "gguf")


def check_export_options(fmt: str, dtype: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    allowed = GGUF_DTYPES if fmt == "gguf" else tuple(FLOAT_DTYPES)
    if dtype not in allowed:
        hint = " (q8_0 is a GGUF type: use --format gguf)" if dtype == "q8_0" else ""
        raise ValueError(
            f"dtype {dtype!r} cannot be written as format {fmt}{hint}; choose from "
            f"{', '.join(allowed)}"
        )


def export(
    model: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "hf",
    dtype: str = "bfloat16",
    adapter: Adapter | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Write `model` (+ `adapter`) to `out` as a Hugging Face directory or a GGUF file."""
    check_export_options(fmt, dtype)
    out = Path(out)
    _check_out(out, fmt, overwrite)
    source = nf4core.open_model(model)
    if adapter is not None:
        check_adapter_fits(adapter, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
            staged = Path(staging) / out.name
            write_model_gguf(source, adapter, staged, dtype)
            _install(staged, out, echo)
        return out
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_hf_dir(staging, dense_tensors(source, adapter), source, dtype)
        _install(staging, out, echo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_model_gguf(
    source: nf4core.ModelSource, adapter: Adapter | None, path: Path, dtype: str = "bfloat16"
) -> Path:
    """`source` (+ `adapter`) as the GGUF file `path`, replaced atomically when it exists."""
    return write_gguf(
        path,
        source.config,
        {name: source.tensor_shape(name) for name in source.tensor_names()},
        dense_tensors(source, adapter),
        tokenizer_metadata(source),
        dtype,
        model_name=Path(source.path).stem,
    )


def dense_tensors(
    source: nf4core.ModelSource, adapter: Adapter | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) one at a time: NF4 dequantized, the adapter merged in when given."""
    reader = source if adapter is None else MergedSource(source, adapter)
    for name in source.tensor_names():
        value = reader.read(name)
        if isinstance(value, nf4core.NF4Tensor):
            value = nf4core.dequantize(value, np.float32)
        yield name, np.asarray(value, np.float32)


def _check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an OUT that is in the way, before any work: a non-empty directory or a file is moved
    aside only with `overwrite`; a GGUF is a file, so never a directory's place."""
    if fmt == "gguf" and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out}: is a directory; the GGUF export writes one file")
    if out.is_dir():
        check_not_locked(out)
    in_the_way = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    if in_the_way and not overwrite:
        what = "file" if not out.is_dir() else "directory, not empty,"
        raise FileExistsError(
            f"{out}: the output {what} exists; pass --overwrite to move it aside "
            f"(to {out.name}.old-N), or choose another OUT"
        )


def _install(staged: Path, out: Path, echo: Callable[[str], None]) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        echo(f"moved the existing {out} aside to {move_aside(out)}")
    os.replace(staged, out)
