"""What every model source offers: a config, tensor names, and one tensor at a time."""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelLoadError
from ..model_config import ModelConfig
from ..tensor import NF4Tensor
from .layout import expected_shapes

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


class ModelSource(ABC):
    """A model on disk, read lazily. `read` returns one tensor (Hugging Face name) at a time."""

    path: Path
    config: ModelConfig

    @functools.cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.config)

    def tensor_names(self) -> list[str]:
        """The model's tensors by Hugging Face name, in checkpoint order (tied lm_head excluded)."""
        return list(self._shapes)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return self._shapes[name]

    def _check_name(self, name: str) -> None:
        if name not in self._shapes:
            raise KeyError(f"{self.path}: the model has no tensor {name!r}")

    def read(self, name: str) -> np.ndarray | NF4Tensor:
        """One tensor: a numpy array, or an NF4Tensor where the checkpoint stores it as NF4.

        ModelLoadError, naming the tensor and its file, if it holds NaN or Inf (NF4 tensors check
        their scales and code tables when they are built).
        """
        self._check_name(name)
        value = self._read(name)
        if isinstance(value, np.ndarray):
            check_finite(value, f"{self.file_of(name)}: tensor {name!r}")
        return value

    def _read(self, name: str) -> np.ndarray | NF4Tensor:
        """The tensor as stored, unchecked (sources that override `read` itself need not)."""
        raise NotImplementedError

    def file_of(self, name: str) -> Path:
        """The file that stores tensor `name`, for messages."""
        return self.path

    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, with its special tokens and chat template."""

    def save_tokenizer(self, directory: Path) -> None:
        """Write the tokenizer files a Hugging Face directory of this model needs."""
        self.tokenizer().save(directory)

    @property
    def dtype(self) -> str:
        """The 16-bit dtype the model's unquantized tensors are kept in ("bfloat16" or "float16")."""
        return "bfloat16"

    def _check_layout(self, available: dict[str, tuple[int, ...]], where: str) -> None:
        """Every expected tensor present with its expected shape, or a one-line error."""
        for name, shape in expected_shapes(self.config).items():
            if name not in available:
                raise ModelLoadError(f"{where}: missing tensor {name!r}")
            if tuple(available[name]) != shape:
                raise ModelLoadError(
                    f"{where}: tensor {name!r} has shape "
                    f"{list(available[name])}, expected {list(shape)}"
                )


def check_finite(array: np.ndarray, what: str, chunk: int = 1 << 22) -> None:
    """ModelLoadError unless every value of a float `array` is finite (checked in slices, so a
    memory-mapped tensor is not copied whole)."""
    if array.dtype.kind not in "fV" or array.size == 0:
        return
    flat = array.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        finite = np.isfinite(part)
        if not finite.all():
            nan = sum(int(np.isnan(flat[i : i + chunk]).sum()) for i in range(0, flat.size, chunk))
            inf = sum(int(np.isinf(flat[i : i + chunk]).sum()) for i in range(0, flat.size, chunk))
            first = start + int(np.flatnonzero(~finite)[0])
            where = tuple(int(i) for i in np.unravel_index(first, array.shape))
            raise ModelLoadError(
                f"{what} holds {nan} NaN and {inf} Inf values (first at index "
                f"{where}); the weights are corrupt"
            )


def normalized(config: ModelConfig) -> ModelConfig:
    """The config with head_dim spelled out, so every source states the same ModelConfig."""
    return dataclasses.replace(config, head_dim=config.resolved_head_dim)
