"""Properties of the format that hold for any input (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import nf4core
from nf4core import blockwise

HALF_LARGEST_GAP = float(np.max(np.diff(nf4core.NF4_CODE.astype(np.float64)))) / 2

finite_weights = arrays(
    dtype=np.float32,
    shape=array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70),
    elements=st.one_of(
        st.just(0.0),
        st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
    ),
)
blocksizes = st.sampled_from(blockwise.ALLOWED_BLOCKSIZES[:4])


@settings(max_examples=150, deadline=None)
@given(w=finite_weights, blocksize=blocksizes)
def test_error_is_bounded_by_half_the_largest_code_gap(w, blocksize):
    t = nf4core.quantize(w, blocksize=blocksize, double_quant=False)
    error = np.abs(nf4core.dequantize(t).astype(np.float64) - w).reshape(-1)
    absmax = np.repeat(t.absmax.astype(np.float64), blocksize)[: w.size]
    # float32 scaling and the product each add a rounding of at most one part in 2**23
    assert np.all(error <= absmax * (HALF_LARGEST_GAP + 2.0**-21))


@settings(max_examples=150, deadline=None)
@given(w=finite_weights, blocksize=blocksizes)
def test_requantizing_the_dequantized_weight_is_the_identity(w, blocksize):
    t = nf4core.quantize(w, blocksize=blocksize, double_quant=False)
    again = nf4core.quantize(nf4core.dequantize(t), blocksize=blocksize, double_quant=False)
    assert again.packed.tobytes() == t.packed.tobytes()
    assert again.absmax.tobytes() == t.absmax.tobytes()


@settings(max_examples=60, deadline=None)
@given(w=finite_weights, blocksize=blocksizes)
def test_double_quant_error_stays_near_the_plain_format(w, blocksize):
    plain = nf4core.quantize(w, blocksize=blocksize, double_quant=False)
    nested = nf4core.quantize(w, blocksize=blocksize, double_quant=True)
    assert nested.packed.tobytes() == plain.packed.tobytes()  # codes use the exact absmax
    # absmax error of the 8-bit stage: half the largest gap of the dynamic map times the block scale
    half_gap = float(np.max(np.diff(nf4core.DYNAMIC_MAP_SIGNED.astype(np.float64)))) / 2
    scale = np.repeat(nested.double_quant.scales.astype(np.float64), 256)[: plain.n_blocks]
    bound = scale * half_gap + 4 * np.spacing(
        np.abs(plain.absmax) + abs(nested.double_quant.offset)
    )
    assert np.all(np.abs(nested.block_absmax() - plain.absmax.astype(np.float64)) <= bound)


def test_bits_per_weight():
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    assert round(nf4core.quantize(w, 64, double_quant=True).bits_per_weight, 3) == 4.127
    assert nf4core.quantize(w, 64, double_quant=False).bits_per_weight == 4.5
    assert nf4core.quantize(w, 4096, double_quant=False).bits_per_weight == 4 + 32 / 4096
    # and the arrays really are that size, up to the shared code tables
    t = nf4core.quantize(w, 64, double_quant=True)
    tables = t.quant_map.nbytes + t.double_quant.quant_map.nbytes + 4  # + the float32 offset
    assert 8 * (t.nbytes - tables) / w.size == t.bits_per_weight


def test_an_odd_count_pads_the_last_low_nibble_with_the_zero_code():
    t = nf4core.quantize(np.array([0.5], np.float32), double_quant=False)
    assert t.packed.tolist() == [0xF7]
    assert nf4core.dequantize(t).tolist() == [0.5]


def test_all_zero_blocks_store_the_zero_code():
    w = np.zeros((3, 64), np.float32)
    w[1, 5] = 2.0
    t = nf4core.quantize(w, 64, double_quant=False)
    codes = t.codes().reshape(3, 64)
    assert np.all(codes[[0, 2]] == 7) and codes[1, 5] == 15
    assert np.all(nf4core.dequantize(t)[[0, 2]] == 0.0)


def test_dequantize_keeps_shape_and_dtype():
    w = np.random.default_rng(1).standard_normal((2, 3, 5)).astype(np.float16)
    t = nf4core.quantize(w)
    assert t.shape == (2, 3, 5) and t.dtype == "float16"
    for dtype in (np.float32, np.float16, "bfloat16"):
        out = nf4core.dequantize(t, dtype)
        assert out.shape == (2, 3, 5) and out.dtype == nf4core.dtypes.float_dtype(dtype)
