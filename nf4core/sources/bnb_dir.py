"""A bitsandbytes 4-bit Hugging Face directory: NF4 weights are returned as stored, never requantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelLoadError, NF4FormatError
from ..state_dict import QUANT_STATE_SUFFIX, nf4_from_state_dict
from ..tensor import NF4Tensor
from .hf_dir import HFDirSource

_NF4_PARTS = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    QUANT_STATE_SUFFIX + "nf4",
)


def check_bnb_quantization(config_path: Path, qconfig: object) -> None:
    """A one-line error unless `qconfig` describes bitsandbytes 4-bit NF4 with uint8 storage."""
    if not isinstance(qconfig, dict):
        raise ModelLoadError(f"{config_path}: quantization_config is not an object")
    method = qconfig.get("quant_method")
    if method != "bitsandbytes":
        raise ModelLoadError(
            f"{config_path}: quantization method {method!r} is not supported "
            "(only bitsandbytes 4-bit NF4)"
        )
    if not qconfig.get("load_in_4bit", qconfig.get("_load_in_4bit")):
        raise ModelLoadError(
            f"{config_path}: bitsandbytes 8-bit checkpoints are not supported (only 4-bit NF4)"
        )
    quant_type = qconfig.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise ModelLoadError(
            f"{config_path}: bnb_4bit_quant_type {quant_type!r} is not supported (only nf4)"
        )
    storage = qconfig.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ModelLoadError(
            f"{config_path}: bnb_4bit_quant_storage {storage!r} is not supported (only uint8)"
        )


class BnbDirSource(HFDirSource):
    """A directory saved by transformers + bitsandbytes with load_in_4bit (nf4), or by quantize_model."""

    def _check_quantization(self, qconfig: object) -> None:
        check_bnb_quantization(self.path / "config.json", qconfig)

    def _layout_shapes(self, available: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Packed weights take the shape their quant state records."""
        shapes = dict(available)
        marker = f".{QUANT_STATE_SUFFIX}"
        for key in available:
            name, found, quant_type = key.partition(marker)
            if not found:
                continue
            if quant_type != "nf4":
                raise ModelLoadError(
                    f"{self._file(key).path}: {name!r} is stored as "
                    f"{quant_type!r}, not nf4 (not supported)"
                )
            shapes[name] = self._read(name).shape
        return shapes

    def _parts(self, name: str) -> list[str]:
        if not self.is_nf4(name):
            return [name]
        return [name] + [f"{name}.{part}" for part in _NF4_PARTS if f"{name}.{part}" in self._where]

    def is_nf4(self, name: str) -> bool:
        return f"{name}.{QUANT_STATE_SUFFIX}nf4" in self._where

    def _is_packed(self, name: str) -> bool:
        return self.is_nf4(name)

    def _read(self, name: str) -> np.ndarray | NF4Tensor:
        """An NF4Tensor for a weight stored as NF4 (bytes as saved), else the array as stored."""
        if not self.is_nf4(name):
            return super()._read(name)
        parts = {name: self._file(name).read(name)}
        for part in _NF4_PARTS:
            key = f"{name}.{part}"
            if key in self._where:
                parts[key] = self._file(key).read(key)
        try:
            return nf4_from_state_dict(parts, name[: -len(".weight")])
        except NF4FormatError as exc:
            raise ModelLoadError(f"{self._file(name).path}: {exc}") from None
