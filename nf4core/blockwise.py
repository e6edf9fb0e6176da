"""Blockwise array kernels of the format, in vectorised numpy: the executable spec.

Every backend's dequantize must equal `decode_nf4` (and `DoubleQuantAbsmax.reconstruct`) bit for bit.
The arithmetic follows bitsandbytes' CPU path step by step, because its rounding is part of the format:
- full blocks are scaled by the float32 reciprocal of their absmax, the last partial block is divided
  by its absmax; an absmax of 0 is replaced by 1e-38 for the scaling (and stored that way for the
  partial block only);
- a code is the nearest NF4 value, a value on a float32 midpoint going to the lower code;
- the 8-bit double quantization divides by the block absmax and takes the nearest map entry by the
  same midpoint rule as NF4.

Note (where we deliberately differ): bitsandbytes 0.50's CPU 8-bit quantizer is not a nearest-value
search (its thresholds sit up to half a gap away from the midpoints near zero), and its CUDA one is a
different search again, so the 8-bit absmax codes of double quantization are an encoder choice that no
two bitsandbytes backends share. We pick the nearest value. Decoding is what must agree, and does:
either library reads the other's data to the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

from .codebooks import DYNAMIC_MAP_SIGNED, NF4_BOUNDS, NF4_ZERO_CODE
from .parallel import for_each_slice

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_TINY = np.float32(1e-38)
_CHUNK_ELEMENTS = 1 << 18  # elements per slice: a slice's temporaries stay in cache


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


class BlockLayout:
    """`numel` and `n_blocks` of a blockwise-quantized weight with `shape` and `blocksize`
    (NF4Tensor here, and each backend's NF4Weight)."""

    shape: tuple[int, ...]
    blocksize: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.numel, self.blocksize)


def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """max |x| of each block of a flat float32 array; float32 (n_blocks,). NaN propagates."""
    full = flat.size - flat.size % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    parts = [np.maximum(blocks.max(axis=1), -blocks.min(axis=1))]  # avoids an |x| copy
    if full < flat.size:
        tail = flat[full:]
        parts.append(np.maximum(tail.max(keepdims=True), -tail.min(keepdims=True)))
    return np.abs(np.concatenate(parts).astype(np.float32, copy=False))  # an all-zero block: +0.0


def nf4_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """The absmax bitsandbytes stores for NF4: as computed, except a zero partial block gets 1e-38."""
    absmax = block_absmax(flat, blocksize)
    if flat.size % blocksize:
        absmax[-1] = max(absmax[-1], _TINY)
    return absmax


def encode_nf4(flat: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """Packed NF4 codes (uint8 ((n + 1) // 2,)) of a flat float32 array with its `nf4_absmax`."""
    full = flat.size - flat.size % blocksize
    packed = np.empty((flat.size + 1) // 2, dtype=np.uint8)
    scale = np.float32(1.0) / np.maximum(absmax[: full // blocksize], _TINY)

    def encode_blocks(start: int, stop: int) -> None:  # element range of whole blocks
        blocks = flat[start:stop].reshape(-1, blocksize)
        scaled = blocks * scale[start // blocksize : stop // blocksize, None]
        codes = nearest_code(scaled.reshape(-1), NF4_BOUNDS)
        packed[start // 2 : stop // 2] = (codes[0::2] << 4) | codes[1::2]

    for_each_slice(full, _chunk_elements(blocksize), encode_blocks)
    if full < flat.size:
        tail = nearest_code(flat[full:] / absmax[-1], NF4_BOUNDS)
        packed[full // 2 :] = pack_nibbles(tail)
    return packed


def _chunk_elements(blocksize: int) -> int:
    return max(_CHUNK_ELEMENTS // blocksize, 1) * blocksize


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble; an odd count pads with the zero code."""
    if codes.size % 2:
        codes = np.append(codes, np.uint8(NF4_ZERO_CODE))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: uint8 codes (numel,)."""
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:numel]


def _pair_table(quant_map: np.ndarray) -> np.ndarray:
    """(256,) uint64: the two float32 code values a packed byte stands for, high nibble first."""
    byte = np.arange(256)
    pairs = np.stack([quant_map[byte >> 4], quant_map[byte & 0x0F]], axis=1).astype(np.float32)
    return pairs.view(np.uint64).reshape(256)


def scale_blocks(values: np.ndarray, absmax: np.ndarray, blocksize: int) -> None:
    """values[i] *= absmax[i // blocksize], in place, in float32 (one rounding per element)."""
    full = values.size - values.size % blocksize
    blocks = values[:full].reshape(-1, blocksize)  # a view: scaling it scales `values`
    blocks *= absmax[: full // blocksize, None]
    if full < values.size:
        values[full:] *= absmax[full // blocksize]


def decode_nf4(
    packed: np.ndarray, absmax: np.ndarray, numel: int, blocksize: int, quant_map: np.ndarray
) -> np.ndarray:
    """float32 (numel,): quant_map[code] * absmax[block], rounded once in float32."""
    pairs = _pair_table(quant_map)
    out = np.empty(packed.size, dtype=np.uint64)  # one uint64 = the float32 pair of one byte
    values = out.view(np.float32)

    def decode_blocks(start: int, stop: int) -> None:  # whole blocks, and the partial one last
        byte_range = slice(start // 2, (stop + 1) // 2)
        np.take(pairs, packed[byte_range], out=out[byte_range], mode="clip")  # "clip": 2x faster
        scale_blocks(values[start:stop], absmax[start // blocksize :], blocksize)

    for_each_slice(numel, _chunk_elements(blocksize), decode_blocks)
    return values[:numel]


def nearest_code(scaled: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Index of the nearest table value, given the float32 midpoints `bounds` of a sorted table.

    A value equal to a midpoint goes to the lower index (bitsandbytes' NF4 rule).
    """
    if len(bounds) > 15:
        return np.searchsorted(bounds, scaled, side="left").astype(np.uint8)
    codes = np.zeros(scaled.shape, dtype=np.uint8)
    for bound in bounds:  # NF4: counting the bounds below beats a binary search fourfold
        codes += scaled > bound
    return codes


def midpoints(table: np.ndarray) -> np.ndarray:
    """float32 decision boundaries between neighbouring values of a sorted float32 table."""
    return (table[:-1] + table[1:]) / np.float32(2)


def quantize_dynamic_blockwise(
    values: np.ndarray, blocksize: int, quant_map: np.ndarray = DYNAMIC_MAP_SIGNED
) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise quantization of a flat float32 array: (uint8 codes, float32 absmax per block).

    values / absmax (float32 division) goes to the nearest map entry, ties to the lower one; an
    all-zero block (absmax 0) stores code 0, as bitsandbytes does.
    """
    absmax = block_absmax(values, blocksize)
    per_element = np.repeat(absmax, blocksize)[: values.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = values / per_element
    codes = nearest_code(normed, midpoints(quant_map))
    codes[per_element == 0] = 0
    return codes, absmax


def dequantize_dynamic_blockwise(
    codes: np.ndarray, absmax: np.ndarray, blocksize: int, quant_map: np.ndarray
) -> np.ndarray:
    """float32: quant_map[code] * absmax[block], rounded once."""
    values = quant_map[codes]
    scale_blocks(values, absmax, blocksize)
    return values
