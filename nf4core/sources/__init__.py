"""Model sources: a Hugging Face directory, a GGUF file or a bitsandbytes 4-bit directory (by path,
or by Hugging Face Hub id)."""

from __future__ import annotations

import os

from ..errors import ModelLoadError
from ..hub import resolve
from ..json_file import read_json
from ..regular_file import check_regular_file
from .base import ModelSource
from .bnb_dir import BnbDirSource
from .gguf_file import GGUFSource
from .hf_dir import HFDirSource
from .layout import expected_shapes, is_quantized_linear

GGUF_MAGIC = b"GGUF"


def open_model(path: str | os.PathLike) -> ModelSource:
    """Open a model for reading, one tensor at a time, without loading it.

    `path` is a Hugging Face directory (config.json + *.safetensors + tokenizer.json), a GGUF file,
    or a bitsandbytes 4-bit (nf4) Hugging Face directory; or a Hub id (`org/name[@revision]`) or
    Hub cache directory standing for one (nf4core.hub). The result has `.config` (ModelConfig),
    `.tensor_names()` (Hugging Face names), `.read(name)` (a numpy array, or an NF4Tensor for
    weights stored as NF4) and `.tokenizer()`. Raises ModelLoadError, naming the file and the
    problem, for anything it cannot read.
    """
    path = resolve(path).path
    if path.is_dir():
        config = read_json(path / "config.json")
        if config.get("quantization_config") is not None:
            return BnbDirSource(path)
        return HFDirSource(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path}: neither a model directory nor a GGUF file "
            f"(starts with {magic!r}, not {GGUF_MAGIC!r})"
        )
    return GGUFSource(path)


__all__ = [
    "BnbDirSource",
    "GGUFSource",
    "HFDirSource",
    "ModelSource",
    "expected_shapes",
    "is_quantized_linear",
    "open_model",
]
