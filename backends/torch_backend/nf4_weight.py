"""`NF4Weight`: an `nf4core.NF4Tensor` held as torch tensors, bit for bit the same data."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from nf4core import DoubleQuantAbsmax, NF4Tensor
from nf4core.blockwise import BlockLayout
from nf4core.codebooks import NESTED_BLOCKSIZE


@dataclass(frozen=True, eq=False)
class NF4Weight(BlockLayout):
    """A frozen NF4 weight on a torch device, in bitsandbytes' layout.

    Attributes:
        packed: uint8 ((numel + 1) // 2,), two codes per byte, the first element in the high nibble.
        absmax: float32 (n_blocks,), or None when the block scales are double-quantized.
        nested_codes: uint8 (n_blocks,) 8-bit absmax codes (double quant), else None.
        nested_scales: float32 (ceil(n_blocks / nested_blocksize),) (double quant), else None.
        nested_quant_map: float32 (256,) (double quant), else None.
        nested_offset: the float32 mean added back after the nested dequantization.
        nested_blocksize: absmax values per nested scale (256).
        quant_map: float32 (16,) NF4 code table.
        shape: original shape; dtype: original dtype name; blocksize: elements per block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    nested_codes: torch.Tensor | None
    nested_scales: torch.Tensor | None
    nested_quant_map: torch.Tensor | None
    nested_offset: float
    nested_blocksize: int
    quant_map: torch.Tensor
    shape: tuple[int, ...]
    dtype: str
    blocksize: int

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1:
            raise ValueError(
                f"packed must be 1-D uint8, got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        if self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(
                f"packed holds {self.packed.numel()} bytes; shape {self.shape} needs "
                f"{(self.numel + 1) // 2}"
            )
        for name in ("absmax", "nested_scales", "nested_quant_map", "quant_map"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32, got {t.dtype}")
        if (self.absmax is None) == (self.nested_codes is None):
            raise ValueError("exactly one of absmax and nested_codes must be given")
        scales = self.absmax if self.absmax is not None else self.nested_codes
        if scales.numel() != self.n_blocks:
            raise ValueError(f"{scales.numel()} block scales for {self.n_blocks} blocks")
        for t in self.tensors():
            if t.device != self.packed.device:
                raise ValueError("all tensors of an NF4Weight must live on one device")

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.nested_codes is not None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds (for byte counts and device checks)."""
        names = (
            "packed",
            "absmax",
            "nested_codes",
            "nested_scales",
            "nested_quant_map",
            "quant_map",
        )
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @classmethod
    def from_nf4(cls, t: NF4Tensor, device: torch.device | str | None = None) -> NF4Weight:
        """Copy an `nf4core.NF4Tensor` onto `device` (default CPU) without changing a bit."""

        def put(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.array(a)).to(device or "cpu")

        dq = t.double_quant
        return cls(
            packed=put(t.packed),
            absmax=put(t.absmax),
            nested_codes=put(dq.codes) if dq else None,
            nested_scales=put(dq.scales) if dq else None,
            nested_quant_map=put(dq.quant_map) if dq else None,
            nested_offset=dq.offset if dq else 0.0,
            nested_blocksize=dq.blocksize if dq else NESTED_BLOCKSIZE,
            quant_map=put(t.quant_map),
            shape=tuple(t.shape),
            dtype=t.dtype,
            blocksize=t.blocksize,
        )

    def to_nf4(self) -> NF4Tensor:
        """Back to an `nf4core.NF4Tensor` (host numpy arrays), bit for bit."""

        def host(x: torch.Tensor | None) -> np.ndarray | None:
            return None if x is None else x.detach().cpu().numpy().copy()

        dq = None
        if self.double_quant:
            dq = DoubleQuantAbsmax(
                codes=host(self.nested_codes),
                scales=host(self.nested_scales),
                offset=self.nested_offset,
                quant_map=host(self.nested_quant_map),
                blocksize=self.nested_blocksize,
            )
        return NF4Tensor(
            packed=host(self.packed),
            absmax=host(self.absmax),
            double_quant=dq,
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            quant_map=host(self.quant_map),
        )

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on `device` (self is unchanged; no other side effect)."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            nested_codes=move(self.nested_codes),
            nested_scales=move(self.nested_scales),
            nested_quant_map=move(self.nested_quant_map),
            quant_map=move(self.quant_map),
        )
