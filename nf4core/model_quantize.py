"""Streaming quantization of a whole model into a Hugging Face bitsandbytes-4bit directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import current_umask, write_text_atomic
from .dtypes import float_dtype
from .errors import ModelLoadError
from .json_file import read_json
from .sources import ModelSource, is_quantized_linear, open_model
from .sources.safetensors_io import SafetensorsWriter
from .state_dict import nf4_to_state_dict
from .tensor import FORMAT_VERSION, NF4Tensor, check_quant_method, quantize
from .validation import check_blocksize

# The quantizer for models quantized from 16/32-bit weights (`quantize`, quantize on load); see
# BENCHMARKS.md "Quantization quality". "absmax" is bitsandbytes' own, bit for bit.
DEFAULT_QUANT_METHOD = "absmax"


@dataclass(frozen=True)
class QuantizeOptions:
    blocksize: int = 64
    double_quant: bool = True
    method: str = DEFAULT_QUANT_METHOD

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize)
        check_quant_method(self.method)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")


def quantization_config(compute_dtype: str, double_quant: bool) -> dict:
    """The `quantization_config` transformers writes for a bitsandbytes 4-bit NF4 model."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
    }


def quantize_model(
    source: str | os.PathLike | ModelSource,
    out_dir: str | os.PathLike,
    blocksize: int = 64,
    double_quant: bool = True,
    method: str = DEFAULT_QUANT_METHOD,
) -> Path:
    """Quantize a model to NF4 and save it as a Hugging Face bitsandbytes-4bit directory.

    `source` is anything `open_model` opens (or an opened source). The attention and MLP weights
    become NF4 (bitsandbytes' layout, double-quantized by default); embeddings, norms, biases and
    lm_head stay 16-bit (the source's bfloat16/float16, else bfloat16). Weights already stored as
    NF4 are copied as they are. Tensors are read, converted and written one at a time, so at most
    one source tensor is held in full precision. `out_dir` gets model.safetensors, config.json and
    the tokenizer files; it must be absent or empty, and appears only once complete. Returns it.
    `method` chooses the block scales (`nf4core.quantize`); the format is the same for every method.
    """
    options = QuantizeOptions(blocksize, double_quant, method)
    src = open_model(source) if isinstance(source, (str, os.PathLike)) else source
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        stored_double_quant = _write_weights(src, staging / "model.safetensors", options)
        _write_config(src, staging, stored_double_quant)
        try:
            src.save_tokenizer(staging)
        except ModelLoadError as exc:  # a model without a usable tokenizer still quantizes
            warnings.warn(f"no tokenizer saved: {exc}", stacklevel=2)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def iter_quantized(
    source: str | os.PathLike | ModelSource,
    blocksize: int = 64,
    double_quant: bool = True,
    method: str = DEFAULT_QUANT_METHOD,
) -> Iterator[tuple[str, NF4Tensor | np.ndarray]]:
    """Every tensor of a model, one at a time, as it is kept in the NF4 model: (name, NF4Tensor) for
    the attention and MLP weights (quantized here, or as stored when the source holds NF4), else
    (name, 16-bit array in the source's dtype). For quantizing on load: drop each value before
    asking for the next, and no two source tensors are ever held in full precision at once."""
    options = QuantizeOptions(blocksize, double_quant, method)
    src = open_model(source) if isinstance(source, (str, os.PathLike)) else source
    dtype = float_dtype(src.dtype)
    for name in src.tensor_names():
        value = src.read(name)
        if isinstance(value, NF4Tensor):  # already NF4: never requantized
            out = value
        elif is_quantized_linear(name):
            out = quantize(
                np.asarray(value).astype(dtype, copy=False),
                options.blocksize,
                options.double_quant,
                options.method,
            )
        else:
            out = np.asarray(value).astype(dtype, copy=False)
        del value  # the next read must not overlap this tensor
        yield name, out
        del out


def _write_weights(src: ModelSource, path: Path, options: QuantizeOptions) -> bool:
    """Stream every tensor into `path`; returns whether the NF4 weights are double-quantized."""
    double_quant = options.double_quant
    metadata = {
        "format": "pt",
        "producer": "nf4core",
        "nf4core_format_version": str(FORMAT_VERSION),
    }
    with SafetensorsWriter(path, metadata=metadata) as writer:
        for name, value in iter_quantized(
            src, options.blocksize, options.double_quant, options.method
        ):
            if isinstance(value, NF4Tensor):
                double_quant = value.double_quant is not None
                entries = nf4_to_state_dict(value, name.removesuffix(".weight"))
            else:
                entries = {name: value}
            del value
            for key, array in entries.items():
                writer.add(key, array)
            del entries
    return double_quant


def _write_config(src: ModelSource, directory: Path, double_quant: bool) -> None:
    config = src.config.to_hf_config()
    config.pop("rope_parameters", None)
    config.update(
        dtype=src.dtype,
        torch_dtype=src.dtype,
        quantization_config=quantization_config(src.dtype, double_quant),
    )
    config.setdefault("hidden_act", "silu")
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2) + "\n")
    original = Path(src.path) / "generation_config.json"
    if original.is_file():  # a Hugging Face source: keep its sampling defaults
        generation = read_json(original)
    else:
        generation = {
            k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None
        }
    write_text_atomic(directory / "generation_config.json", json.dumps(generation, indent=2) + "\n")
