"""Read a model from an `nf4core.ModelSource` (HF directory, GGUF file, bitsandbytes directory)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from nf4core import ModelSource


class SourceTensors(Mapping):
    """A read-only mapping over a source's tensors that reads each one only when asked, so building a
    model holds one dense tensor at a time (linears are quantized as they arrive)."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.names = set(source.tensor_names())

    def __getitem__(self, name: str) -> object:
        if name not in self.names:
            raise KeyError(name)
        return self.source.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.tensor_names())

    def __len__(self) -> int:
        return len(self.names)
