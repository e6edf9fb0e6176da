"""A bounded cache of dequantized NF4 weights for inference (generation, exact-match decoding).

Decoding calls every linear once per token with one row of input. Dequantizing the whole weight for
each call costs 13-29x a dense FP32 `F.linear` on a CPU (bench/decode_vs_transformers.py). Inside
`DequantCache.active()` and with autograd off, an NF4 linear keeps its dequantized weight (the same
bits as `ops.dequantize`) and multiplies with `F.linear`: after the first token it runs at the dense
layer's speed. Training never uses it (grad enabled): the NF4 linear must not keep W between forward
and backward.

With the CPU GEMV kernel (cpu_gemv.py) decoding needs no dense copy: `for_decoding` gives a cache
with no budget when the kernel covers the decode steps' rows (`gemv_covers`, which also lives here:
it depends on the active cache), so the cache holds weights only where the kernel does not run (no
compiler, a failed self-check, a forced path, more rows than it takes).

Note (policy): decoding visits the layers in the same order every token, so an LRU cache smaller
than the model would evict each weight just before its next use and never hit. This cache fills up
to its byte budget and then stops adding: the first layers that fit stay, the rest dequantize per
call, and the hit rate is budget / model size. Budget: NF4_QLORA_DEQUANT_CACHE_MB (default 1024; 0
turns it off). CPU tensors on the auto path only: NF4_KERNELS=reference or triton bypasses
it, and GPU tensors keep their fused 4-bit kernels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from . import cpu_gemv, dispatch, self_check

DEFAULT_BUDGET_MB = 1024
_current: list[DequantCache] = []


def budget_from_env() -> int:
    """The byte budget NF4_QLORA_DEQUANT_CACHE_MB asks for (default 1024 MiB)."""
    raw = os.environ.get("NF4_QLORA_DEQUANT_CACHE_MB", str(DEFAULT_BUDGET_MB))
    try:
        mb = float(raw)
    except ValueError:
        msg = f"NF4_QLORA_DEQUANT_CACHE_MB must be a number of MiB, got {raw!r}"
        raise ValueError(msg) from None
    if mb < 0:
        raise ValueError(f"NF4_QLORA_DEQUANT_CACHE_MB must be >= 0, got {raw!r}")
    return int(mb * 2**20)


class DequantCache:
    """Dequantized weights keyed by their packed tensor (the module's buffer), valid while none of
    the weight's tensors has changed in place (their version counters)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = budget_from_env() if budget_bytes is None else budget_bytes
        self.used = 0
        self._entries: dict[
            tuple[int, torch.dtype], tuple[torch.Tensor, tuple[int, ...], torch.Tensor]
        ] = {}

    @classmethod
    def for_decoding(cls, rows: int, dtype: torch.dtype, device: torch.device) -> DequantCache:
        """The cache for decode steps of `rows` rows: budget 0 when the CPU GEMV kernel covers them
        (it reads the 4-bit codes, and a prefill of more rows runs it or dequantizes per call)."""
        probe = torch.empty(rows, 1, dtype=dtype, device=device)
        return cls(budget_bytes=0 if gemv_covers(probe) else None)

    @contextlib.contextmanager
    def active(self) -> Iterator[DequantCache]:
        """NF4 linears called inside the block (with grad off) use this cache; nests."""
        _current.append(self)
        try:
            yield self
        finally:
            _current.pop()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def dense(
        self,
        tensors: Sequence[torch.Tensor],
        numel: int,
        dtype: torch.dtype,
        make: Callable[[], torch.Tensor],
    ) -> torch.Tensor | None:
        """The dense weight of the NF4 data `tensors` (packed codes first) in `dtype`: cached, or
        made by `make()` and cached, or None when it does not fit the budget."""
        packed = tensors[0]
        key = (id(packed), dtype)
        versions = tuple(t._version for t in tensors)
        entry = self._entries.get(key)
        if entry is not None:
            held, held_versions, dense = entry
            if held is packed and held_versions == versions:
                return dense
            self.used -= dense.numel() * dense.element_size()
            del self._entries[key]
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.used + nbytes > self.budget:
            return None
        dense = make()
        self._entries[key] = (packed, versions, dense)  # holding packed keeps its id unique
        self.used += nbytes
        return dense


def active_cache() -> DequantCache | None:
    """The cache NF4 linears may use now, or None: no cache active, or autograd on."""
    if not _current or torch.is_grad_enabled():
        return None
    return _current[-1]


def gemv_covers(x: torch.Tensor) -> bool:
    """Whether `ops.linear` on input `x` (..., in) takes the CPU GEMV kernel now (cpu_gemv.py's
    module doc says which calls do)."""
    if not x.is_cpu or x.dtype not in cpu_gemv.DTYPES:
        return False
    path = dispatch.requested()
    if path == "cpu":
        return True
    if path != "auto" or "cpu" in dispatch.AUTO_TRITON_DEVICES:  # (tests) auto takes Triton there
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > cpu_gemv.MAX_ROWS:
        cache = active_cache()
        if rows > cpu_gemv.MAX_ROWS_PER_CALL or (cache is not None and cache.budget > 0):
            return False
    return self_check.cpu_gemv_trusted(x.dtype)
