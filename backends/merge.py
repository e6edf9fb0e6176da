"""Fold a LoRA adapter into its base: a 16-bit (or float32) Hugging Face directory, or NF4 again.

Backend-neutral (numpy). The base the adapter was trained on is the NF4-quantized one, so a dense
source is quantized and dequantized first (an NF4 source is dequantized as it is). Tensors stream
through one at a time; the directory is built under a temporary name and renamed into place, so it
never exists half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

import nf4core
from nf4core.dtypes import FLOAT_DTYPES
from nf4core.model_config import LINEAR_NAMES

from .hf_dir_writer import write_hf_dir
from .nonfinite import NonFiniteError
from .peft_adapter import PEFT_PREFIX, Adapter, check_adapter_fits

LINEARS = LINEAR_NAMES


def merged_tensors(source: nf4core.ModelSource, adapter: Adapter, dtype: str):
    """Yield (name, array in `dtype`) with every adapted linear as W_nf4 + scale * B @ A (DoRA:
    each row of that rescaled to its magnitude, `Adapter.merged_weight`)."""
    modules = set(adapter.modules())
    for name in source.tensor_names():
        value = _merged(source, name, modules, adapter).astype(FLOAT_DTYPES[dtype], copy=False)
        if not np.isfinite(value).all():
            raise NonFiniteError(
                f"{_named(adapter)}: merged into the base, {name} would hold NaN "
                f"or infinite values in {dtype}; nothing was written"
            )
        yield name, value


def _merged(
    source: nf4core.ModelSource, name: str, modules: set[str], adapter: Adapter
) -> np.ndarray:
    value = source.read(name)
    module = name.removesuffix(".weight")
    if isinstance(value, nf4core.NF4Tensor):
        w = nf4core.dequantize(value, np.float32)
    elif name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
        method = nf4core.model_quantize.DEFAULT_QUANT_METHOD  # as finetune quantized it on load
        w = nf4core.dequantize(
            nf4core.quantize(np.asarray(value, np.float32), method=method), np.float32
        )
    else:
        w = np.asarray(value, np.float32)
    if module in modules:
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, by name
            w = adapter.merged_weight(module, w)
        if not np.isfinite(w).all():
            raise NonFiniteError(
                f"{_named(adapter)}: merged into the base, {name} would hold NaN "
                "or infinite values (check the adapter's weights and lora_alpha); "
                "nothing was written"
            )
    return w


def _named(adapter: Adapter) -> str:
    return str(adapter.directory) if adapter.directory is not None else "the adapter"


class MergedSource(nf4core.ModelSource):
    """`source` with `adapter` folded in, read one tensor at a time (float32), for `quantize_model`."""

    def __init__(self, source: nf4core.ModelSource, adapter: Adapter) -> None:
        self.source, self.adapter = source, adapter
        self.path, self.config = source.path, source.config
        self._modules = set(adapter.modules())

    def tensor_names(self) -> list[str]:
        return self.source.tensor_names()

    def read(self, name: str) -> np.ndarray:
        return _merged(self.source, name, self._modules, self.adapter)

    def tokenizer(self) -> nf4core.Tokenizer:
        return self.source.tokenizer()

    def save_tokenizer(self, directory: Path) -> None:
        self.source.save_tokenizer(directory)

    @property
    def dtype(self) -> str:
        return self.source.dtype


def merge(
    model: str | os.PathLike,
    adapter: Adapter,
    out: str | os.PathLike,
    dtype: str = "bfloat16",
    requantize: bool = False,
) -> Path:
    """Write the merged model to `out` (a Hugging Face directory; bitsandbytes-NF4 when `requantize`).
    Tensors are merged and written one at a time: memory holds one weight, not the model."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: the output directory exists and is not empty")
    source = nf4core.open_model(model)
    check_adapter_fits(adapter, source)
    if requantize:
        return nf4core.quantize_model(MergedSource(source, adapter), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_hf_dir(tmp, merged_tensors(source, adapter, dtype), source, dtype)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["MergedSource", "merge", "merged_tensors", "PEFT_PREFIX"]
