"""The `mse` quantizer: the same format as bitsandbytes' (read by bitsandbytes to our values) with a
lower reconstruction error than absmax rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest

import nf4core
from nf4core import blockwise
from nf4core.state_dict import nf4_to_state_dict

bnb = pytest.importorskip("tests.nf4core.bnb_oracle")


def _relative_error(w: np.ndarray, t: nf4core.NF4Tensor) -> float:
    w = w.astype(np.float64)
    return float(((w - nf4core.dequantize(t).astype(np.float64)) ** 2).sum() / (w**2).sum())


@pytest.mark.parametrize("double_quant", [False, True])
def test_same_keys_tables_json_and_bits_as_absmax(double_quant):
    w = np.random.default_rng(0).standard_normal((48, 320)).astype(np.float32)
    absmax = nf4_to_state_dict(nf4core.quantize(w, 64, double_quant, method="absmax"), "m")
    mse_t = nf4core.quantize(w, 64, double_quant, method="mse")
    mse = nf4_to_state_dict(mse_t, "m")
    assert sorted(mse) == sorted(absmax)
    state_key = "m.weight.quant_state.bitsandbytes__nf4"
    for key in absmax:
        if key == state_key:  # JSON text: the offset's digits may differ in number
            continue
        assert (mse[key].dtype, mse[key].shape) == (absmax[key].dtype, absmax[key].shape), key
    for key in ("m.weight.quant_map", "m.weight.nested_quant_map"):
        if key in absmax:
            assert mse[key].tobytes() == absmax[key].tobytes()
    mine, theirs = (json.loads(bytes(d[state_key]).decode()) for d in (mse, absmax))
    assert sorted(mine) == sorted(theirs)
    assert {k: v for k, v in mine.items() if k != "nested_offset"} == {
        k: v for k, v in theirs.items() if k != "nested_offset"
    }
    assert mse_t.bits_per_weight == pytest.approx(4.127 if double_quant else 4.5, abs=1e-3)
    assert not np.array_equal(mse["m.weight"], absmax["m.weight"])  # it did choose other bytes


@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(7, 63), (64, 64), (2, 3, 257), (1000,)], ids=str)
def test_bitsandbytes_dequantizes_mse_data_to_our_values(shape, double_quant, blocksize):
    import torch

    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    t = nf4core.quantize(w, blocksize, double_quant, method="mse")
    sd = nf4_to_state_dict(t, "lin")
    qs = bnb.quant_state_from(sd, "lin")
    if bnb.cpu_kernel_is_reliable(shape, blocksize):
        theirs = bnb.dequantize(torch.from_numpy(sd["lin.weight"].copy()), qs)
        assert theirs.tobytes() == nf4core.dequantize(t).tobytes()
    else:  # bitsandbytes' C path misplaces scales here; its absmax reconstruction is still ours
        absmax = (
            qs.absmax.numpy()
            if not double_quant
            else (bnb.F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).numpy()
        )
        assert absmax.tobytes() == t.block_absmax().tobytes()


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("kind", ["normal", "student_t", "uniform"])
def test_error_is_lower_than_absmax_on_random_weights(kind, double_quant, blocksize):
    rng = np.random.default_rng(2)
    w = {
        "normal": lambda: rng.standard_normal((256, 512)),
        "student_t": lambda: rng.standard_t(4, (256, 512)),
        "uniform": lambda: rng.uniform(-1, 1, (256, 512)),
    }[kind]().astype(np.float32)
    absmax = _relative_error(w, nf4core.quantize(w, blocksize, double_quant, method="absmax"))
    mse = _relative_error(w, nf4core.quantize(w, blocksize, double_quant, method="mse"))
    assert mse < 0.95 * absmax, (mse, absmax)  # measured 0.70-0.93 (least on heavy tails)


@pytest.mark.parametrize("double_quant", [False, True])
def test_no_stored_scale_clips_its_blocks_largest_value_by_more_than_5_percent(double_quant):
    rng = np.random.default_rng(6)
    w = (rng.standard_t(3, (64, 1024)) * rng.uniform(0.01, 1, (64, 1))).astype(np.float32)
    w[0, :64] = 0.0
    stored = nf4core.quantize(w, 64, double_quant, method="mse").block_absmax()
    peak = np.abs(w.reshape(-1, 64)).max(axis=1)
    stored, peak = stored[1:], peak[1:]  # a zero block's scale multiplies only zeros
    assert (stored >= peak * np.float32(0.95 * (1 - 1e-6))).all()
    assert (stored < peak * 0.999).any() and (stored > peak * 1.001).any()  # it does search


def test_double_quant_is_optimised_for_the_stored_scale():
    """Choosing among the nested codes beats rounding ideal scales to the nearest nested code (one
    code up where the nearest would clip the block's largest value by more than 5%)."""
    w = np.random.default_rng(3).standard_normal((128, 1024)).astype(np.float32)
    ideal = nf4core.quantize(w, 64, double_quant=False, method="mse").absmax
    nested = nf4core.DoubleQuantAbsmax.from_absmax(ideal)
    assert (np.diff(nested.quant_map) > 0).all()  # so code + 1 is the next larger scale
    peak = np.abs(w.reshape(-1, 64)).max(axis=1)
    clips = nested.reconstruct() < peak * np.float32(0.95)
    assert clips.any()
    codes = nested.codes + clips.astype(np.uint8)
    rounded = nf4core.DoubleQuantAbsmax(
        codes=codes, scales=nested.scales, offset=nested.offset
    ).reconstruct()
    assert (rounded >= peak * np.float32(0.95)).all()
    naive = nf4core.NF4Tensor(
        packed=blockwise.encode_nf4(w.reshape(-1), rounded, 64),
        absmax=rounded,
        double_quant=None,
        shape=w.shape,
        dtype="float32",
    )
    stored = nf4core.quantize(w, 64, double_quant=True, method="mse")
    assert _relative_error(w, stored) < _relative_error(w, naive)


def test_zero_blocks_and_a_partial_block_decode_exactly():
    w = np.random.default_rng(4).standard_normal(64 * 5 + 9).astype(np.float32)
    w[64:128] = 0.0
    w[-9:] = 0.0
    for double_quant in (False, True):
        out = nf4core.dequantize(nf4core.quantize(w, 64, double_quant, method="mse"))
        assert np.all(out[64:128] == 0) and np.all(out[-9:] == 0)
        assert np.isfinite(out).all()


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="quantization method.*'gptq'"):
        nf4core.quantize(np.ones((4, 64), np.float32), method="gptq")


@pytest.mark.slow
def test_error_is_lower_than_absmax_on_the_default_models_weights():
    source = nf4core.open_model(nf4core.default_model_path())
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.15.self_attn.v_proj.weight",
        "model.layers.29.mlp.gate_proj.weight",
    ]
    ratios = []
    for name in names:
        w = np.asarray(source.read(name), np.float32)
        absmax = _relative_error(w, nf4core.quantize(w, 64, True, method="absmax"))
        mse = _relative_error(w, nf4core.quantize(w, 64, True, method="mse"))
        ratios.append(mse / absmax)
    assert max(ratios) < 0.9 and np.mean(ratios) < 0.85, ratios


@pytest.mark.parametrize("kind", ["constant", "one_value", "wide_range", "bfloat16"])
def test_edge_inputs_decode_finite_and_no_worse_than_absmax(kind):
    rng = np.random.default_rng(5)
    w = {
        "constant": lambda: np.full((8, 64), 0.3, np.float32),
        "one_value": lambda: np.array([0.5], np.float32),
        "wide_range": lambda: (
            rng.standard_normal((64, 64)) * np.logspace(-20, 10, 64)[:, None]
        ).astype(np.float32),
        "bfloat16": lambda: rng.standard_normal((16, 128)).astype(nf4core.dtypes.bfloat16),
    }[kind]()
    exact = w.astype(np.float64)
    for double_quant in (False, True):
        errors = []
        for method in ("absmax", "mse"):
            out = nf4core.dequantize(nf4core.quantize(w, 64, double_quant, method))
            assert np.isfinite(out).all()
            errors.append(((exact - out) ** 2).sum())
        assert errors[1] <= errors[0]
