"""Fold a LoRA adapter into its base: a 16-bit (or float32) Hugging Face directory, or NF4 again.

Backend-neutral (numpy). The base the adapter was trained on is the NF4-quantized one, so a dense
source is quantized and dequantized first (an NF4 source is dequantized as it is). The directory is
built under a temporary name and renamed into place: it never exists half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

import nf4core
from nf4core.atomic import atomic_file, write_text_atomic
from nf4core.model_config import LINEAR_NAMES

from .peft_adapter import PEFT_PREFIX, Adapter

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
LINEARS = LINEAR_NAMES


def merged_tensors(source: nf4core.ModelSource, adapter: Adapter, dtype: str):
    """Yield (name, array in `dtype`) with every adapted linear as W_nf4 + scale * B @ A."""
    modules = set(adapter.modules())
    for name in source.tensor_names():
        value = source.read(name)
        module = name.removesuffix(".weight")
        is_linear = name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS
        if isinstance(value, nf4core.NF4Tensor):
            w = nf4core.dequantize(value, np.float32)
        elif is_linear:
            w = nf4core.dequantize(nf4core.quantize(np.asarray(value, np.float32)), np.float32)
        else:
            w = np.asarray(value, np.float32)
        if module in modules:
            w = w + adapter.delta(module)
        yield name, w.astype(DTYPES[dtype])


def merge(model: str | os.PathLike, adapter: Adapter, out: str | os.PathLike, dtype: str = "bfloat16",
          requantize: bool = False) -> Path:
    """Write the merged model to `out` (a Hugging Face directory; bitsandbytes-NF4 when `requantize`)."""
    from safetensors.numpy import save

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: the output directory exists and is not empty")
    source = nf4core.open_model(model)
    missing = [m for m in adapter.modules() if f"{m}.weight" not in set(source.tensor_names())]
    if missing:
        raise ValueError(f"the adapter has modules the model lacks, e.g. {missing[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        dense = tmp / "dense" if requantize else tmp / "model"
        dense.mkdir()
        tensors = dict(merged_tensors(source, adapter, "float32" if requantize else dtype))
        with atomic_file(dense / "model.safetensors") as f:
            f.write(save(tensors, metadata={"format": "pt"}))
        del tensors
        config = source.config.to_hf_config()
        config["torch_dtype"] = "float32" if requantize else dtype
        write_text_atomic(dense / "config.json", json.dumps(config, indent=2) + "\n")
        source.save_tokenizer(dense)
        final = dense
        if requantize:
            final = tmp / "model"
            nf4core.quantize_model(dense, final)
        if out.exists():
            out.rmdir()
        os.replace(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["merge", "merged_tensors", "PEFT_PREFIX"]
