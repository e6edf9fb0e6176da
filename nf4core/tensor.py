"""`NF4Tensor`, the quantized weight, and the `quantize` / `dequantize` entry points."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import blockwise, mse_scales
from .codebooks import DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE, NF4_CODE
from .dtypes import FLOAT_DTYPES, float_dtype
from .errors import NF4FormatError
from .validation import as_weight_array, check_blocksize, non_finite_error

FORMAT_VERSION = 1


def _frozen(array: np.ndarray, dtype: type, ndim: int, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != dtype:
        raise NF4FormatError(f"{what} must be {np.dtype(dtype)}, got {array.dtype}")
    if array.ndim != ndim:
        raise NF4FormatError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    view = np.ascontiguousarray(array).view()  # read-only through the tensor, no copy
    view.flags.writeable = False
    return view


def _check_finite(array: np.ndarray, what: str) -> None:
    """A scale or code table with NaN or Inf would turn every weight it touches into NaN."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise NF4FormatError(f"{what} holds non-finite values (first at index {bad}: {array[bad]})")


@dataclass(frozen=True, eq=False)
class DoubleQuantAbsmax:
    """The block absmax, itself quantized to 8 bits (bitsandbytes' "nested" statistics).

    absmax[i] = quant_map[codes[i]] * scales[i // blocksize] + offset, each step rounded to float32.
    """

    codes: np.ndarray  # uint8 (n_blocks,)
    scales: np.ndarray  # float32 (ceil(n_blocks / blocksize),), bitsandbytes' "nested_absmax"
    offset: float  # a float32 value: the mean of the absmax before quantization
    quant_map: np.ndarray = field(default_factory=lambda: DYNAMIC_MAP_SIGNED)  # float32 (256,)
    blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "codes", _frozen(self.codes, np.uint8, 1, "nested absmax codes"))
        set_(self, "scales", _frozen(self.scales, np.float32, 1, "nested_absmax"))
        set_(self, "quant_map", _frozen(self.quant_map, np.float32, 1, "nested_quant_map"))
        set_(self, "blocksize", check_blocksize(self.blocksize, "nested blocksize"))
        _check_finite(self.scales, "nested_absmax")
        _check_finite(self.quant_map, "nested_quant_map")
        try:
            with np.errstate(over="ignore"):
                offset = np.float32(self.offset)
        except (TypeError, ValueError, OverflowError):
            offset = np.float32("nan")
        if isinstance(self.offset, bool) or not np.isfinite(offset):
            raise NF4FormatError(f"nested offset must be a finite float32, got {self.offset!r}")
        set_(self, "offset", float(offset))
        if self.quant_map.shape != (256,):
            raise NF4FormatError(
                f"nested_quant_map must hold 256 values, got {self.quant_map.shape}"
            )
        expected = blockwise.n_blocks(self.codes.size, self.blocksize)
        if self.scales.size != expected:
            raise NF4FormatError(
                f"nested_absmax has {self.scales.size} values, but {self.codes.size} absmax codes "
                f"in blocks of {self.blocksize} need {expected}"
            )

    @classmethod
    def from_absmax(
        cls, absmax: np.ndarray, blocksize: int = NESTED_BLOCKSIZE
    ) -> DoubleQuantAbsmax:
        offset = np.float32(np.mean(absmax, dtype=np.float64))
        codes, scales = blockwise.quantize_dynamic_blockwise(absmax - offset, blocksize)
        return cls(codes=codes, scales=scales, offset=float(offset), blocksize=blocksize)

    def reconstruct(self) -> np.ndarray:
        """float32 absmax per NF4 block: multiply, round, add the offset, round (never fused)."""
        scaled = blockwise.dequantize_dynamic_blockwise(
            self.codes, self.scales, self.blocksize, self.quant_map
        )
        return scaled + np.float32(self.offset)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + 4 + self.quant_map.nbytes


@dataclass(frozen=True, eq=False)
class NF4Tensor(blockwise.BlockLayout):
    """A weight in 4-bit NormalFloat, laid out exactly as bitsandbytes stores it.

    Attributes:
        packed: uint8 ((numel + 1) // 2,), two codes per byte, the first element in the high nibble.
        absmax: float32 (n_blocks,) block scales, or None when they are double-quantized.
        double_quant: the 8-bit form of the block scales, or None.
        shape: the original shape.
        dtype: the original dtype's name ("float32", "float16" or "bfloat16").
        blocksize: elements per block (32 .. 4096, a power of two).
        quant_map: float32 (16,) code table (NF4_CODE unless a file says otherwise).
        format_version: version of this in-memory format.
    """

    packed: np.ndarray
    absmax: np.ndarray | None
    double_quant: DoubleQuantAbsmax | None
    shape: tuple[int, ...]
    dtype: str
    blocksize: int = 64
    quant_map: np.ndarray = field(default_factory=lambda: NF4_CODE)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "shape", tuple(int(d) for d in self.shape))
        set_(self, "blocksize", check_blocksize(self.blocksize))
        if self.dtype not in FLOAT_DTYPES:
            raise NF4FormatError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype!r}")
        if self.format_version != FORMAT_VERSION:
            raise NF4FormatError(f"unknown NF4Tensor format version {self.format_version}")
        if any(d < 0 for d in self.shape) or self.numel == 0:
            raise NF4FormatError(f"shape {self.shape} holds no elements")
        set_(self, "packed", _frozen(self.packed, np.uint8, 1, "packed NF4 codes"))
        set_(self, "quant_map", _frozen(self.quant_map, np.float32, 1, "quant_map"))
        if self.quant_map.shape != (16,):
            raise NF4FormatError(f"quant_map must hold 16 values, got shape {self.quant_map.shape}")
        _check_finite(self.quant_map, "quant_map")
        if self.packed.size != (self.numel + 1) // 2:
            raise NF4FormatError(
                f"packed codes hold {self.packed.size} bytes, but shape {list(self.shape)} "
                f"({self.numel} elements) needs {(self.numel + 1) // 2}"
            )
        if (self.absmax is None) == (self.double_quant is None):
            raise NF4FormatError("exactly one of absmax and double_quant must be given")
        n_scales = self.n_blocks
        if self.absmax is not None:
            set_(self, "absmax", _frozen(self.absmax, np.float32, 1, "absmax"))
            _check_finite(self.absmax, "absmax")
            got = self.absmax.size
        else:
            got = self.double_quant.codes.size
        if got != n_scales:
            raise NF4FormatError(
                f"absmax has {got} values, but {self.numel} elements in blocks of "
                f"{self.blocksize} need {n_scales}"
            )

    def block_absmax(self) -> np.ndarray:
        """float32 (n_blocks,): the scale of every block, reconstructed if double-quantized."""
        if self.double_quant is not None:
            return self.double_quant.reconstruct()
        return self.absmax

    def codes(self) -> np.ndarray:
        """uint8 (numel,): the 4-bit code of every element, in row-major order."""
        return blockwise.unpack_nibbles(self.packed, self.numel)

    @property
    def nbytes(self) -> int:
        """Bytes of every array this tensor holds, code tables included."""
        scales = self.absmax.nbytes if self.absmax is not None else self.double_quant.nbytes
        return self.packed.nbytes + scales + self.quant_map.nbytes

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight of the format (see `bits_per_weight`)."""
        dq = self.double_quant
        return bits_per_weight(self.blocksize, None if dq is None else dq.blocksize)


def bits_per_weight(blocksize: int, nested_blocksize: int | None = NESTED_BLOCKSIZE) -> float:
    """Storage per weight: 4 bits of code plus the block scales. 4 + 32/blocksize without double quant
    (`nested_blocksize` None); 4 + 8/blocksize + 32/(blocksize * nested_blocksize) with it (4.127 at
    blocksize 64). The code tables are shared constants and not counted."""
    if nested_blocksize is None:
        return 4.0 + 32.0 / blocksize
    return 4.0 + 8.0 / blocksize + 32.0 / (blocksize * nested_blocksize)


QUANT_METHODS = ("absmax", "mse")


def quantize(
    w: object, blocksize: int = 64, double_quant: bool = True, method: str = "absmax"
) -> NF4Tensor:
    """Quantize a float32, float16 or bfloat16 array of any shape to NF4 (bitsandbytes' layout).

    Each run of `blocksize` consecutive elements (row-major) shares one scale; each element gets the
    nearest NF4 code under it, ties to the lower code. With `double_quant` the scales are quantized
    again to 8 bits in blocks of 256 around their mean.

    `method` chooses the scales, never the format: "absmax" is bitsandbytes' quantizer bit for bit
    (scale = max |x| of the block); "mse" stores, per block, the scale with the least squared
    reconstruction error after its own double quantization among those that clip the block's
    largest value by at most 5% (see nf4core.mse_scales). Both are read by any bitsandbytes-format
    reader with no change.
    """
    blocksize = check_blocksize(blocksize)
    check_quant_method(method)
    flat, dtype = as_weight_array(w)
    shape = tuple(np.shape(w))
    absmax = blockwise.nf4_absmax(flat, blocksize)
    if not np.isfinite(absmax).all():  # NaN and Inf reach the block maxima, so this check is free
        raise non_finite_error(flat, shape)
    peak = absmax
    if method == "mse":
        absmax = mse_scales.ideal_scales(flat, peak, blocksize)
    nested = DoubleQuantAbsmax.from_absmax(absmax) if double_quant else None
    if method == "mse" and double_quant:
        codes = mse_scales.best_nested_codes(flat, absmax, peak, blocksize, nested)
        nested = DoubleQuantAbsmax(codes=codes, scales=nested.scales, offset=nested.offset)
        absmax = nested.reconstruct()  # the codes are the nearest under the scale that is stored
    packed = blockwise.encode_nf4(flat, absmax, blocksize)
    return NF4Tensor(
        packed=packed,
        absmax=None if double_quant else absmax,
        double_quant=nested,
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
    )


def check_quant_method(method: object) -> str:
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization method must be one of {QUANT_METHODS}, got {method!r}")
    return method


def dequantize(t: NF4Tensor, dtype: object = np.float32) -> np.ndarray:
    """The weight as an array of `dtype` in its original shape: code value * block absmax in float32,
    then one rounding to `dtype`."""
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"dequantize expects an NF4Tensor, got {type(t).__name__}")
    out_dtype = float_dtype(dtype)
    values = blockwise.decode_nf4(t.packed, t.block_absmax(), t.numel, t.blocksize, t.quant_map)
    return values.astype(out_dtype, copy=False).reshape(t.shape)
