"""The `mse` quantizer: per block, the stored scale with the least squared error among those that
clip the block's largest weight by at most 5% (no scale below `CLIP_FLOOR` x absmax).

The format is unchanged (the same codes, tables and double quantization): only the float scale of
each block is chosen differently. bitsandbytes stores absmax = max|x|, so one outlier stretches the
whole block; a larger scale can put the codes nearer most values, a slightly smaller one clips the
largest value by at most 1 - `CLIP_FLOOR`. Unconstrained, the least-error scale clips the largest
weight of about 60% of the default model's blocks (of 40% by more than 5%): 20% less squared error
than absmax, but a worse perplexity, because those outliers matter more to the network than their
share of the squared error (BENCHMARKS.md, "Quantization quality").

The search, vectorised over all blocks:
1. ideal scales: a grid of `GRID` x absmax, then one least-squares step (with the codes fixed, the
   best scale is <x, c> / <c, c>, raised to the floor if below it), kept where it lowers the error;
2. with double quantization, the ideal scales are double-quantized as bitsandbytes does (offset =
   their mean, nested absmax per 256 blocks), then each block takes whichever of the 8-bit codes
   nearest its ideal (the nearest and its `NESTED_NEIGHBOURS` on each side) reconstructs to the
   scale with the least error, among those at or above the floor (rounding up where rounding down
   would clip more), so the error is minimised for the scale that is actually stored.
Codes are then the nearest under the stored scale (`blockwise.encode_nf4`, the absmax path's rule).

Note: the search rates a scale with codes from a fine lookup table (`_CodeLookup`) instead of the
exact nearest-code search, 3-4x faster; a value within 1/3000 of a code midpoint may be rated under
the other code. Only the search uses it; the stored codes are exact nearest codes.
"""

from __future__ import annotations

import numpy as np

from .codebooks import NF4_BOUNDS, NF4_CODE
from .parallel import for_each_slice

CLIP_FLOOR = np.float32(0.95)  # the least stored scale, as a multiple of absmax
GRID = np.linspace(CLIP_FLOOR, 1.3, 12, dtype=np.float32)  # candidate scales, x absmax
NESTED_NEIGHBOURS = 1  # 8-bit codes tried on each side of the one nearest the ideal scale
_CHUNK_ELEMENTS = 1 << 17


class _CodeLookup:
    """The NF4 value nearest to u, read from a table of `bins` uniform bins over [lo, hi)."""

    def __init__(self, lo: float = -2.5, hi: float = 2.5, bins: int = 16384) -> None:
        centres = (lo + (np.arange(bins) + 0.5) * (hi - lo) / bins).astype(np.float32)
        self.values = NF4_CODE[np.searchsorted(NF4_BOUNDS, centres, side="left")]
        self.a = np.float32(bins / (hi - lo))
        self.b = np.float32(-lo * bins / (hi - lo))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # a NaN scale (a candidate ruled out) gives any index
            index = (u * self.a + self.b).astype(np.int32)
        return np.take(self.values, index, mode="clip")  # beyond [lo, hi): the end codes


_LOOKUP = _CodeLookup()


def _codes_and_errors(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code values (n, bs) and squared errors (n,) of float32 blocks (n, bs) under scales (n,) > 0
    (NaN: ruled out, error NaN). The error is taken in code units and scaled back: one pass less."""
    scaled = blocks * (np.float32(1) / scales)[:, None]
    values = _LOOKUP(scaled)
    scaled -= values
    return values, np.einsum("ij,ij->i", scaled, scaled) * (scales * scales)


def _for_each_chunk(flat: np.ndarray, blocksize: int, fn) -> None:
    """fn(blocks (n, bs), first block index) over chunks of whole blocks, then the partial last
    block padded with zeros (a zero adds no error under any scale: its code is 0.0)."""
    full = flat.size - flat.size % blocksize
    step = max(_CHUNK_ELEMENTS // blocksize, 1) * blocksize
    for_each_slice(full, step, lambda a, b: fn(flat[a:b].reshape(-1, blocksize), a // blocksize))
    if full < flat.size:
        tail = np.zeros((1, blocksize), np.float32)
        tail[0, : flat.size - full] = flat[full:]
        fn(tail, full // blocksize)


def ideal_scales(flat: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """float32 (n_blocks,): per block the scale with the least squared error, before any double
    quantization (grid, then one least-squares step), none below `CLIP_FLOOR` x absmax. All-zero
    blocks keep their absmax."""
    scales = absmax.copy()

    def search(blocks: np.ndarray, first: int) -> None:
        given = absmax[first : first + len(blocks)]
        nonzero = given > 0
        peak = np.where(nonzero, given, np.float32(1))
        best = np.full(len(blocks), np.inf, np.float32)
        chosen = peak.copy()
        for t in GRID:
            candidate = peak * t
            _, err = _codes_and_errors(blocks, candidate)
            better = err < best
            best[better], chosen[better] = err[better], candidate[better]
        values, _ = _codes_and_errors(blocks, chosen)
        norm = np.einsum("ij,ij->i", values, values)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = (np.einsum("ij,ij->i", blocks, values) / norm).astype(np.float32)
        fitted = np.where((norm > 0) & (fitted > 0), fitted, chosen)
        fitted = np.maximum(fitted, peak * CLIP_FLOOR)
        _, err = _codes_and_errors(blocks, fitted)
        chosen = np.where(err < best, fitted, chosen)
        scales[first : first + len(blocks)] = np.where(nonzero, chosen, given)

    _for_each_chunk(flat, blocksize, search)
    return scales


def best_nested_codes(
    flat: np.ndarray, ideal: np.ndarray, absmax: np.ndarray, blocksize: int, nested
) -> np.ndarray:
    """uint8 (n_blocks,): for the double quantization `nested` of the `ideal` scales (its offset and
    nested absmax kept), each block's 8-bit code among the nearest and its neighbours whose
    reconstructed scale gives the block the least squared error. A candidate below `CLIP_FLOOR` x
    the block's `absmax` is not considered; a block with none left keeps the highest candidate."""
    table = nested.quant_map
    nested_absmax = np.repeat(nested.scales, nested.blocksize)[: ideal.size]
    offsets = np.arange(-NESTED_NEIGHBOURS, NESTED_NEIGHBOURS + 1)
    codes = np.clip(nested.codes.astype(np.int32)[:, None] + offsets, 0, table.size - 1)
    # reconstructed as DoubleQuantAbsmax.reconstruct does: multiply, round, add the offset, round
    candidates = (table[codes] * nested_absmax[:, None]) + np.float32(nested.offset)  # (n, k)
    # the floor less a few float32 steps: the nested code that reconstructs it may land just below
    floor = absmax * (CLIP_FLOOR * np.float32(1 - 1e-6))
    allowed = (candidates >= floor[:, None]) & (ideal[:, None] > 0)
    rated = np.where(allowed, candidates, np.float32(np.nan))
    chosen = codes[:, -1].copy()

    def pick(blocks: np.ndarray, first: int) -> None:
        rows = slice(first, first + len(blocks))
        best = np.full(len(blocks), np.inf, np.float32)
        for k in range(codes.shape[1]):
            _, err = _codes_and_errors(blocks, rated[rows, k])
            better = err < best  # NaN (ruled out) is never better
            best[better] = err[better]
            chosen[rows][better] = codes[rows, k][better]

    _for_each_chunk(flat, blocksize, pick)
    zero_blocks = ideal <= 0
    chosen[zero_blocks] = nested.codes[zero_blocks]
    return chosen.astype(np.uint8)
