"""A dense Hugging Face model directory from a stream of tensors: what `merge` and `export` write."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import nf4core
from nf4core.atomic import write_text_atomic
from nf4core.dtypes import FLOAT_DTYPES
from nf4core.sources.safetensors_io import SafetensorsWriter

from .nonfinite import NonFiniteError


def write_hf_dir(
    directory: Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    source: nf4core.ModelSource,
    dtype: str,
) -> None:
    """model.safetensors (in `dtype`), config.json, generation_config.json and the tokenizer files
    into `directory` (an existing, empty one)."""
    with SafetensorsWriter(directory / "model.safetensors", metadata={"format": "pt"}) as writer:
        for name, value in tensors:
            value = value.astype(FLOAT_DTYPES[dtype], copy=False)
            if not np.isfinite(value).all():
                raise NonFiniteError(
                    f"{source.path}: {name} would hold NaN or infinite values in {dtype}; "
                    "nothing was written"
                )
            writer.add(name, value)
            del value
    config = source.config.to_hf_config()
    config.pop("quantization_config", None)  # an NF4 source's: the weights written are dense
    config["torch_dtype"] = dtype
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2) + "\n")
    generation = {
        k: v
        for k, v in (
            ("bos_token_id", config.get("bos_token_id")),
            ("eos_token_id", config.get("eos_token_id")),
        )
        if v is not None
    }
    write_text_atomic(directory / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    source.save_tokenizer(directory)
