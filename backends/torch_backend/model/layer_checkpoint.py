"""Activation checkpointing of one decoder layer that recomputes only what backward reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(layer: nn.Module, x: torch.Tensor, *args: object) -> torch.Tensor:
    """`layer(x, *args)` under non-reentrant activation checkpointing: only the inputs are kept and
    backward runs the layer's forward again. In that second run the MLP's down projection output is
    never read (the layer's recomputed output is discarded; backward reads what the projection
    saved), so a down projection that can leave its frozen base matmul out (LoRALinear's
    `output_unused`) does: at Llama shapes that is a quarter of the layer's matmul FLOPs."""
    runs: list[None] = []

    def run(*inputs: object) -> torch.Tensor:
        runs.append(None)
        if len(runs) == 1:
            return layer(*inputs)
        with _unused_output(layer.mlp.down_proj):
            return layer(*inputs)

    return checkpoint(run, x, *args, use_reentrant=False)


@contextlib.contextmanager
def _unused_output(module: nn.Module) -> Iterator[None]:
    if not hasattr(module, "output_unused"):
        yield
        return
    module.output_unused = True
    try:
        yield
    finally:
        module.output_unused = False
