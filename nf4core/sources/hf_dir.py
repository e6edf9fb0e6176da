"""A Hugging Face model directory: config.json, *.safetensors (one file or an index), tokenizer.json."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..dtypes import FLOAT_DTYPES
from ..errors import ModelLoadError
from ..json_file import read_json
from ..model_config import ModelConfig
from ..regular_file import check_regular_file
from ..tensor import NF4Tensor
from .base import ModelSource, normalized
from .safetensors_io import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old checkpoints
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def config_from_json(path: Path, raw: dict) -> ModelConfig:
    try:
        return normalized(ModelConfig.from_hf_config(raw))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


class HFDirSource(ModelSource):
    """A Hugging Face directory with 16/32-bit weights in safetensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.raw_config = read_json(self.path / "config.json")
        self._check_quantization(self.raw_config.get("quantization_config"))
        self.config = config_from_json(self.path / "config.json", self.raw_config)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = self._tensor_map()
        available = {name: self._file(name).shape(name) for name in self._where}
        self._check_layout(self._layout_shapes(available), str(self.path))
        for name in self.tensor_names():
            dtype = self._file(name).dtype(name)
            if not self._is_packed(name) and dtype.name not in FLOAT_DTYPES:
                raise ModelLoadError(
                    f"{self._file(name).path}: tensor {name!r} is {dtype.name}; "
                    "expected float32, float16 or bfloat16"
                )
        self._check_all_consumed()

    def _parts(self, name: str) -> list[str]:
        """The stored tensors that make up the model tensor `name`."""
        return [name]

    def _check_all_consumed(self) -> None:
        """Every stored tensor is one the config describes: nothing is silently dropped."""
        used = {part for name in self.tensor_names() for part in self._parts(name)}
        config_path = self.path / "config.json"
        for name in self._where:
            if name in used or _DERIVED.fullmatch(name):
                continue
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
                raise ModelLoadError(
                    f"{config_path}: num_hidden_layers is "
                    f"{self.config.num_hidden_layers}, but the weights hold "
                    f"{name!r} (layer {layer.group(1)})"
                )
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                if np.array_equal(
                    self._file(name).read(name),
                    self._file("model.embed_tokens.weight").read("model.embed_tokens.weight"),
                ):
                    continue
                raise ModelLoadError(
                    f"{config_path}: tie_word_embeddings is true, but "
                    f"{self._file(name).path} holds an lm_head.weight that "
                    "differs from the embeddings"
                )
            raise ModelLoadError(
                f"{self._file(name).path}: tensor {name!r} is not part of the "
                f"{self.config.architecture} model config.json describes "
                "(not supported)"
            )

    def _is_packed(self, name: str) -> bool:
        return False

    def _check_quantization(self, qconfig: object) -> None:
        if qconfig is not None:
            raise ModelLoadError(
                f"{self.path / 'config.json'}: has a quantization_config; "
                "open it with open_model to read it as a quantized checkpoint"
            )

    def _layout_shapes(self, available: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return available

    def _tensor_map(self) -> dict[str, str]:
        """Tensor name -> the safetensors file (relative to the directory) that holds it."""
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{index}: has no 'weight_map' object")
            checked: set[str] = set()
            for file in weight_map.values():
                if not isinstance(file, str) or file not in checked:
                    self._check_shard_name(index, file)
                    checked.add(file)
            self._check_shards_match(index, weight_map)
            return dict(weight_map)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            pickled = [f for f in _PICKLE_FILES if (self.path / f).exists()]
            hint = (
                (
                    f" (found {pickled[0]}: pickled checkpoints are never loaded; convert it to "
                    "safetensors)"
                )
                if pickled
                else ""
            )
            raise ModelLoadError(f"{self.path}: no *.safetensors weights{hint}")
        where: dict[str, str] = {}
        for shard in shards:
            for name in self._open(shard).names():
                if name in where:
                    raise ModelLoadError(
                        f"{self.path}: tensor {name!r} is stored twice, in "
                        f"{where[name]} and {shard}"
                    )
                where[name] = shard
        return where

    def _check_shard_name(self, index: Path, file: object) -> None:
        """A shard is a regular file named relative to the directory, and stays inside it."""
        if not isinstance(file, str) or not file:
            raise ModelLoadError(f"{index}: weight_map values must be file names, got {file!r}")
        relative = Path(file)
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelLoadError(f"{index}: shard {file!r} lies outside the model directory")
        shard = self.path / relative
        if not shard.exists():
            raise ModelLoadError(f"{index}: names shard {file!r}, which is missing")
        if not shard.resolve().is_relative_to(self.path.resolve()):
            raise ModelLoadError(f"{index}: shard {file!r} links outside the model directory")
        check_regular_file(shard)

    def _check_shards_match(self, index: Path, weight_map: dict) -> None:
        """Each shard holds exactly the tensors the index assigns to it."""
        for file in sorted(set(weight_map.values())):
            listed = {name for name, f in weight_map.items() if f == file}
            stored = set(self._open(file).names())
            for name in sorted(stored - listed):
                other = weight_map.get(name)
                where = f"assigns it to {other}" if other else "does not list it"
                raise ModelLoadError(
                    f"{self.path / file}: holds tensor {name!r}, but {INDEX_FILE} "
                    f"{where} (a tensor stored twice or a stale index)"
                )

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.path / file)
        return self._files[file]

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        file = self._open(self._where[name])
        if name not in file:
            raise ModelLoadError(f"{file.path}: missing tensor {name!r} (listed in {INDEX_FILE})")
        return file

    def _read(self, name: str) -> np.ndarray | NF4Tensor:
        """One tensor as stored (float32/float16/bfloat16), mapped read-only from its file."""
        return self._file(name).read(name)

    def file_of(self, name: str) -> Path:
        return self._file(name).path

    @property
    def dtype(self) -> str:
        declared = self.raw_config.get("torch_dtype") or self.raw_config.get("dtype")
        return declared if declared in ("bfloat16", "float16") else "bfloat16"

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(self.path)

    def save_tokenizer(self, directory: Path) -> None:
        """Copy the tokenizer files as they are (after checking that they load)."""
        self.tokenizer()
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                with open(self.path / name, "rb") as src, atomic_file(directory / name) as dst:
                    shutil.copyfileobj(src, dst)
