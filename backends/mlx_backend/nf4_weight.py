"""`NF4Weight`: an `nf4core.NF4Tensor` held as mlx arrays, bit for bit (bitsandbytes' layout)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nf4core import DoubleQuantAbsmax, NF4Tensor
from nf4core.blockwise import BlockLayout
from nf4core.codebooks import NESTED_BLOCKSIZE

from ._mlx import mx


@dataclass(frozen=True, eq=False)
class NF4Weight(BlockLayout):
    """A frozen NF4 weight on the device.

    The nibble order is bitsandbytes' (first element in the HIGH nibble), not MLX's own LSB-first
    order; every op in this backend reads it that way.

    Attributes:
        packed: uint8 ((numel + 1) // 2,) packed codes.
        absmax: float32 (n_blocks,), or None when double-quantized.
        dq_codes: uint8 (n_blocks,) 8-bit absmax codes, or None.
        dq_scales: float32 (ceil(n_blocks / dq_blocksize),) nested absmax, or None.
        dq_offset: the float32 offset added after the nested product.
        dq_quant_map: float32 (256,) nested code table, or None.
        quant_map: float32 (16,) NF4 code table.
        shape, dtype, blocksize, dq_blocksize: as in `NF4Tensor`.
    """

    packed: mx.array
    absmax: mx.array | None
    dq_codes: mx.array | None
    dq_scales: mx.array | None
    dq_offset: float
    dq_quant_map: mx.array | None
    quant_map: mx.array
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    dq_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        if self.packed.dtype != mx.uint8 or self.packed.ndim != 1:
            raise ValueError(
                f"packed codes must be 1-d uint8, got {self.packed.dtype} {self.packed.shape}"
            )
        if self.packed.size != (self.numel + 1) // 2:
            raise ValueError(f"{self.packed.size} packed bytes do not hold shape {self.shape}")
        if (self.absmax is None) == (self.dq_codes is None):
            raise ValueError("exactly one of absmax and dq_codes must be given")

    @property
    def double_quant(self) -> bool:
        return self.dq_codes is not None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> list[mx.array]:
        """Every device array of the weight (for mx.eval and memory accounting)."""
        arrays = (
            self.packed,
            self.absmax,
            self.dq_codes,
            self.dq_scales,
            self.dq_quant_map,
            self.quant_map,
        )
        return [a for a in arrays if a is not None]

    @classmethod
    def from_nf4(cls, t: NF4Tensor) -> NF4Weight:
        """Copy an `NF4Tensor` to mlx arrays without changing a bit."""
        if not isinstance(t, NF4Tensor):
            raise TypeError(f"expected an NF4Tensor, got {type(t).__name__}")
        dq = t.double_quant
        return cls(
            packed=mx.array(t.packed),
            absmax=None if t.absmax is None else mx.array(t.absmax),
            dq_codes=None if dq is None else mx.array(dq.codes),
            dq_scales=None if dq is None else mx.array(dq.scales),
            dq_offset=0.0 if dq is None else dq.offset,
            dq_quant_map=None if dq is None else mx.array(dq.quant_map),
            quant_map=mx.array(t.quant_map),
            shape=tuple(t.shape),
            dtype=t.dtype,
            blocksize=t.blocksize,
            dq_blocksize=NESTED_BLOCKSIZE if dq is None else dq.blocksize,
        )

    def to_nf4(self) -> NF4Tensor:
        """Back to an `NF4Tensor` (numpy), bit for bit."""
        dq = None
        if self.double_quant:
            dq = DoubleQuantAbsmax(
                codes=np.array(self.dq_codes),
                scales=np.array(self.dq_scales),
                offset=self.dq_offset,
                quant_map=np.array(self.dq_quant_map),
                blocksize=self.dq_blocksize,
            )
        return NF4Tensor(
            packed=np.array(self.packed),
            absmax=None if self.absmax is None else np.array(self.absmax),
            double_quant=dq,
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            quant_map=np.array(self.quant_map),
        )
