"""A model builder's strict view of named tensors: nothing offered is dropped, nothing asked for is
made up.

Both backends build their models through `StrictTensors`: `check_names()` refuses, in one line, a
state whose names differ from what the config describes; `get(name)` hands out a tensor (checking its
shape) and records that the builder used it; `check_all_used()` refuses, in one line, a state of
which the builder left a tensor unread (a bias it does not implement, say), so no weight is silently
ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import ModelLoadError
from .model_config import ModelConfig
from .sources.layout import expected_shapes

# Rotary inverse frequencies that old checkpoints saved: transformers recomputes them from the config
# (a non-persistent buffer) and drops saved ones on load without a warning; so do we.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
TIED_HEAD = "lm_head.weight"
_SHOWN = 3  # names listed per kind before "(+N more)"


class StrictTensors:
    """Read-through view of `tensors` (numpy arrays, torch tensors or NF4Tensors, by Hugging Face
    name) for a model of `config`. `where` names the state in messages (default: the source's file
    when `tensors` wraps an `nf4core.ModelSource`, else "model state")."""

    def __init__(
        self, tensors: Mapping[str, object], config: ModelConfig, where: str | None = None
    ) -> None:
        self.tensors, self.config = tensors, config
        self.shapes = expected_shapes(config)
        self.used: set[str] = set()
        source = getattr(tensors, "source", None)
        self._source = source
        self.where = where or (str(source.path) if source is not None else "model state")

    def check_names(self) -> None:
        """ModelLoadError (one line) unless the names offered are exactly those the config needs.
        With tied embeddings an lm_head.weight may be offered; it is the embedding matrix itself in
        transformers' checkpoints and is ignored, as transformers ties it."""
        offered = set(self.tensors)
        missing = [n for n in self.shapes if n not in offered]
        unexpected = [n for n in self.tensors if n not in self.shapes and not self._ignorable(n)]
        self._raise(unexpected, missing)

    def get(self, name: str) -> object:
        """The tensor `name` (its shape checked against the config's); the builder has used it."""
        if name not in self.tensors:
            self._raise([], [name])
        value = self.tensors[name]
        self.used.add(name)
        want, shape = self.shapes.get(name), tuple(getattr(value, "shape", ()))
        if want is not None and shape != want:
            raise ModelLoadError(
                f"{self._where(name)}: tensor {name} has shape {list(shape)}, expected {list(want)}"
            )
        return value

    def check_all_used(self) -> None:
        """ModelLoadError (one line) naming every tensor offered that the builder did not use."""
        self._raise([n for n in self.tensors if n not in self.used and not self._ignorable(n)], [])

    def _ignorable(self, name: str) -> bool:
        return bool(_IGNORED.fullmatch(name)) or (
            name == TIED_HEAD and self.config.tie_word_embeddings
        )

    def _where(self, name: str | None = None) -> str:
        if name is not None and self._source is not None and hasattr(self._source, "file_of"):
            try:
                return str(self._source.file_of(name))
            except (KeyError, ValueError):
                return self.where
        return self.where

    def _raise(self, unexpected: list[str], missing: list[str]) -> None:
        parts = []
        if unexpected:
            parts.append(f"unexpected tensors: {_listed(unexpected)}")
        if missing:
            parts.append(f"missing: {_listed(missing)}")
        if parts:
            first = unexpected[0] if unexpected else None
            c = self.config
            described = (
                f" (config: {c.architecture}, attention_bias={c.attention_bias}, "
                f"mlp_bias={c.mlp_bias}, tie_word_embeddings={c.tie_word_embeddings})"
            )
            raise ModelLoadError(f"{self._where(first)}: {'; '.join(parts)}{described}")


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
