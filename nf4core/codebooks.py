"""The lookup tables of the format.

`NF4_CODE` (16 entries) maps a 4-bit code to its normalized value; `DYNAMIC_MAP_SIGNED` (256 entries)
is bitsandbytes' signed dynamic 8-bit map used for double quantization of the block absmax. Both hold
bitsandbytes' exact float32 values; the functions below derive them from their definitions so a test
can show where the numbers come from.
"""

from __future__ import annotations

import numpy as np

NF4_OFFSET = 0.9677083  # quantile at which the outermost NF4 value sits (QLoRA paper, appendix)

NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.flags.writeable = False
NF4_ZERO_CODE = 7  # NF4_CODE[7] == 0.0; pads an odd element count

# Decision boundaries between neighbouring codes, computed in float32 as bitsandbytes does. A value
# equal to a boundary goes to the lower code.
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
NF4_BOUNDS.flags.writeable = False

# Positive half of bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`,
# shortest float32 spellings; the negative half is its exact negation.
_DYNAMIC_POSITIVE = np.array(
    [
        5.5000004e-07,
        3.2500002e-06,
        7.75e-06,
        2.1249998e-05,
        4.375e-05,
        6.625e-05,
        8.875e-05,
        0.00015625001,
        0.00026875004,
        0.00038125002,
        0.00049375003,
        0.0006062501,
        0.00071875006,
        0.00083125,
        0.0009437501,
        0.0012812499,
        0.00184375,
        0.00240625,
        0.00296875,
        0.0035312497,
        0.00409375,
        0.0046562497,
        0.0052187503,
        0.00578125,
        0.00634375,
        0.00690625,
        0.00746875,
        0.00803125,
        0.00859375,
        0.009156249,
        0.00971875,
        0.01140625,
        0.01421875,
        0.01703125,
        0.019843752,
        0.02265625,
        0.02546875,
        0.028281251,
        0.03109375,
        0.03390625,
        0.036718752,
        0.03953125,
        0.042343747,
        0.04515625,
        0.04796875,
        0.05078125,
        0.05359375,
        0.05640625,
        0.059218753,
        0.06203125,
        0.06484375,
        0.067656256,
        0.070468746,
        0.07328125,
        0.07609375,
        0.07890625,
        0.08171876,
        0.08453125,
        0.08734375,
        0.09015625,
        0.092968754,
        0.09578126,
        0.09859375,
        0.107031256,
        0.12109375,
        0.13515624,
        0.14921875,
        0.16328125,
        0.17734376,
        0.19140625,
        0.20546874,
        0.21953125,
        0.23359375,
        0.24765624,
        0.26171875,
        0.27578127,
        0.28984374,
        0.30390626,
        0.31796873,
        0.33203125,
        0.34609374,
        0.36015624,
        0.37421876,
        0.38828123,
        0.40234375,
        0.41640624,
        0.43046874,
        0.44453126,
        0.45859373,
        0.47265625,
        0.4867187,
        0.50078124,
        0.5148437,
        0.5289062,
        0.54296875,
        0.5570313,
        0.5710938,
        0.58515626,
        0.5992187,
        0.61328125,
        0.6273438,
        0.6414063,
        0.65546876,
        0.6695312,
        0.68359375,
        0.6976563,
        0.7117188,
        0.72578126,
        0.7398437,
        0.75390625,
        0.7679688,
        0.78203124,
        0.79609376,
        0.8101562,
        0.82421875,
        0.8382813,
        0.85234374,
        0.86640626,
        0.8804687,
        0.89453125,
        0.9085938,
        0.92265624,
        0.93671876,
        0.9507812,
        0.96484375,
        0.9789063,
        0.99296874,
    ],
    dtype=np.float32,
)
DYNAMIC_MAP_SIGNED = np.concatenate(
    [-_DYNAMIC_POSITIVE[::-1], [0.0], _DYNAMIC_POSITIVE, [1.0]]
).astype(np.float32)
DYNAMIC_MAP_SIGNED.flags.writeable = False
NESTED_BLOCKSIZE = 256


def nf4_code_from_normal_quantiles(offset: float = NF4_OFFSET) -> np.ndarray:
    """Derive the NF4 table from quantiles of a unit normal (float32[16]).

    Eight positive values from `norm.ppf(linspace(offset, 0.5, 9)[:-1])`, seven negative ones from
    the mirrored seven-point grid, plus an exact zero; sorted and scaled so the largest is 1.
    Needs scipy (a test dependency); the runtime uses the exact table `NF4_CODE`.
    """
    try:
        from scipy.stats import norm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("deriving the NF4 table needs scipy: pip install scipy") from exc
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return (values / values.max()).astype(np.float32)


def dynamic_map_from_definition(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """Derive the signed dynamic map in float64 (bitsandbytes computes it in float32).

    For exponent e = 0 .. max_exponent_bits-1 the map holds the 2**(e + total_bits - 1 -
    max_exponent_bits) midpoints of an even grid on [0.1, 1], scaled by 10**(e + 1 - max_exponent_bits),
    with both signs; then 0 and 1. Sorted ascending.
    """
    sign_free_bits = total_bits - 1
    if max_exponent_bits != sign_free_bits:
        raise ValueError("only the map with max_exponent_bits == total_bits - 1 is defined here")
    values = [0.0, 1.0]
    for exponent in range(max_exponent_bits):
        grid = np.linspace(0.1, 1.0, 2 ** (exponent + sign_free_bits - max_exponent_bits) + 1)
        means = (grid[:-1] + grid[1:]) / 2.0 * 10.0 ** (exponent + 1 - max_exponent_bits)
        values.extend(means)
        values.extend(-means)
    return np.sort(np.array(values, dtype=np.float64))
