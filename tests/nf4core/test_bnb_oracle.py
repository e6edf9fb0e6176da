"""nf4core against bitsandbytes on the CPU. Zero tolerance where the format contract says bit-exact."""

import json

import numpy as np
import pytest

import nf4core
from nf4core import blockwise
from nf4core.dtypes import bfloat16
from nf4core.state_dict import nf4_to_state_dict
from tests.nf4core import bnb_oracle as bnb

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(1, 1), (7, 63), (5, 100), (64, 64), (1000,), (3, 5, 7), (33, 160), (2, 3, 257)]
DTYPES = [np.float32, np.float16, bfloat16]


def weights(shape, dtype, seed=0, zero_blocks=False):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    if zero_blocks:
        flat = w.reshape(-1)
        flat[: min(flat.size, 64)] = 0.0  # a whole block at the start
        flat[-min(flat.size, 7) :] = 0.0  # and the tail (all of a partial block when it is short)
    return w.astype(dtype)


def ours_and_theirs(w, blocksize, double_quant, prefix="model.layers.0.mlp.up_proj"):
    t = nf4core.quantize(w, blocksize=blocksize, double_quant=double_quant)
    packed, qs = bnb.quantize(w, blocksize, double_quant)
    return t, nf4_to_state_dict(t, prefix), bnb.state_dict(packed, qs, prefix), packed, qs


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plain_absmax_is_bit_exact(shape, dtype, blocksize):
    w = weights(shape, dtype, seed=blocksize, zero_blocks=True)
    t, ours, theirs, packed, qs = ours_and_theirs(w, blocksize, double_quant=False)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].tobytes() == theirs[key].tobytes(), key  # codes, absmax, table, JSON
    for out_dtype in (np.float32, np.float16, bfloat16):
        mine = nf4core.dequantize(t, out_dtype)
        by_definition = (
            (nf4core.NF4_CODE[t.codes()] * np.repeat(qs.absmax.numpy(), blocksize)[: w.size])
            .astype(out_dtype)
            .reshape(shape)
        )  # bitsandbytes' data, the format's formula
        assert mine.tobytes() == by_definition.tobytes()
    if bnb.cpu_kernel_is_reliable(shape, blocksize):
        assert nf4core.dequantize(t, w.dtype).tobytes() == bnb.dequantize(packed, qs).tobytes()


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_double_quant_matches_within_float32_rounding(shape, dtype, blocksize):
    w = weights(shape, dtype, seed=blocksize + 1, zero_blocks=True)
    t, ours, theirs, packed, qs = ours_and_theirs(w, blocksize, double_quant=True)
    prefix = "model.layers.0.mlp.up_proj.weight"
    assert ours.keys() == theirs.keys()
    for suffix in ("", ".quant_map", ".nested_quant_map"):  # NF4 codes and both tables
        assert ours[prefix + suffix].tobytes() == theirs[prefix + suffix].tobytes(), suffix
    state_ours = json.loads(bytes(ours[prefix + ".quant_state.bitsandbytes__nf4"]))
    state_theirs = json.loads(bytes(theirs[prefix + ".quant_state.bitsandbytes__nf4"]))
    offset_ours, offset_theirs = state_ours.pop("nested_offset"), state_theirs.pop("nested_offset")
    assert state_ours == state_theirs
    assert abs(offset_ours - offset_theirs) <= 2 * np.spacing(np.float32(offset_theirs))
    # The nested scales are block maxima of (absmax - offset): equal up to the offset's rounding.
    np.testing.assert_allclose(
        ours[prefix + ".nested_absmax"],
        theirs[prefix + ".nested_absmax"],
        rtol=0,
        atol=4 * float(np.spacing(np.float32(offset_theirs))),
    )
    # Our 8-bit absmax codes are the nearest map values; bitsandbytes' CPU search is coarser.
    dq = t.double_quant
    plain_absmax = blockwise.nf4_absmax(np.asarray(w, np.float32).reshape(-1), blocksize)
    target = plain_absmax - np.float32(dq.offset)
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-equal nested block has scale 0
        normed = np.nan_to_num(target.astype(np.float64) / np.repeat(dq.scales, 256)[: target.size])
    mine = np.abs(dq.quant_map[dq.codes] - normed)
    theirs_err = np.abs(dq.quant_map[theirs[prefix + ".absmax"]] - normed)
    assert np.all(mine <= theirs_err + 1e-7)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(7, 63), (64, 64), (2, 3, 257), (1000,)], ids=str)
def test_files_cross_between_the_libraries_with_the_same_values(shape, double_quant, blocksize):
    w = weights(shape, np.float32, seed=7)
    t, ours, theirs, packed, qs = ours_and_theirs(w, blocksize, double_quant, prefix="lin")
    # bitsandbytes' file read by nf4core
    from_bnb = nf4core.nf4_from_state_dict(theirs, "lin")
    bnb_absmax = qs.absmax.numpy() if not double_quant else None
    if double_quant:
        bnb_absmax = (bnb.F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).numpy()
    assert from_bnb.block_absmax().tobytes() == bnb_absmax.tobytes()
    if bnb.cpu_kernel_is_reliable(shape, blocksize):
        assert nf4core.dequantize(from_bnb).tobytes() == bnb.dequantize(packed, qs).tobytes()
    # nf4core's file read by bitsandbytes
    qs_from_ours = bnb.quant_state_from(ours, "lin")
    assert qs_from_ours.blocksize == blocksize and list(qs_from_ours.shape) == list(shape)
    if bnb.cpu_kernel_is_reliable(shape, blocksize):
        import torch

        their_view = bnb.dequantize(torch.from_numpy(ours["lin.weight"].copy()), qs_from_ours)
        assert their_view.tobytes() == nf4core.dequantize(t).tobytes()


def test_large_random_matrix_is_bit_exact():
    w = weights((1024, 4096), np.float32, seed=3)
    t, ours, theirs, packed, qs = ours_and_theirs(w, 64, double_quant=False, prefix="big")
    for key in ours:
        assert ours[key].tobytes() == theirs[key].tobytes(), key
    assert nf4core.dequantize(t).tobytes() == bnb.dequantize(packed, qs).tobytes()


def test_ties_go_to_the_lower_code_like_bitsandbytes():
    # Values on the float32 midpoints between codes, in a block whose absmax is exactly 1.
    bounds = blockwise.midpoints(nf4core.NF4_CODE)
    w = np.concatenate([[1.0], bounds, np.nextafter(bounds, np.float32(2))]).astype(np.float32)
    t, ours, theirs, *_ = ours_and_theirs(w, 64, double_quant=False, prefix="tie")
    assert ours["tie.weight"].tobytes() == theirs["tie.weight"].tobytes()
    codes = t.codes()
    np.testing.assert_array_equal(codes[1:16], np.arange(15))  # a tie takes the lower code
    np.testing.assert_array_equal(codes[16:31], np.arange(1, 16))  # one ulp above takes the upper
