"""Bad input gets a clear error that names the problem."""

import json

import numpy as np
import pytest

import nf4core
from nf4core import NF4FormatError
from nf4core.state_dict import nf4_to_state_dict


def good_state_dict(double_quant=True, prefix="m"):
    w = np.random.default_rng(0).standard_normal((8, 100)).astype(np.float32)
    return nf4_to_state_dict(nf4core.quantize(w, 64, double_quant), prefix)


def test_nan_and_inf_are_counted_and_located():
    w = np.ones((4, 70), np.float32)
    w[1, 3] = np.nan
    w[2, 0] = np.inf
    w[3, 69] = np.nan
    with pytest.raises(ValueError, match=r"2 NaN and 1 Inf .*first at index \(1, 3\)"):
        nf4core.quantize(w)


@pytest.mark.parametrize(
    "w, error, message",
    [
        (np.zeros((0, 5), np.float32), ValueError, "empty"),
        (np.float32(1.0), ValueError, "scalar"),
        (np.ones(10, np.int32), TypeError, "int32"),
        (np.ones(10, bool), TypeError, "bool"),
        (np.ones(10, np.float64), TypeError, "float64"),
        (np.ones(10, np.complex64), TypeError, "complex64"),
        ("weights", TypeError, "str"),
    ],
)
def test_unusable_weights(w, error, message):
    with pytest.raises(error, match=message):
        nf4core.quantize(w)


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0, -64])
def test_blocksizes_bitsandbytes_does_not_allow(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize} is not allowed"):
        nf4core.quantize(np.ones(64, np.float32), blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [64.0, True, "64"])
def test_blocksize_must_be_an_int(blocksize):
    with pytest.raises(TypeError, match="blocksize must be an int"):
        nf4core.quantize(np.ones(64, np.float32), blocksize=blocksize)


def test_dequantize_rejects_other_objects_and_dtypes():
    with pytest.raises(TypeError, match="expects an NF4Tensor"):
        nf4core.dequantize(np.ones(3))
    t = nf4core.quantize(np.ones(64, np.float32))
    with pytest.raises(TypeError, match="int8"):
        nf4core.dequantize(t, np.int8)


@pytest.mark.parametrize(
    "missing",
    [
        "m.weight",
        "m.weight.absmax",
        "m.weight.quant_map",
        "m.weight.nested_absmax",
        "m.weight.nested_quant_map",
        "m.weight.quant_state.bitsandbytes__nf4",
    ],
)
def test_missing_keys_are_named(missing):
    sd = good_state_dict()
    del sd[missing]
    with pytest.raises(NF4FormatError, match="missing '" + missing.replace(".", r"\.")):
        nf4core.nf4_from_state_dict(sd, "m")


def with_state(sd, **changes):
    key = "m.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key]))
    state.update(changes)
    for name in [k for k, v in changes.items() if v is None]:
        del state[name]
    sd[key] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    return sd


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"shape": [8, 101]}, "packed codes hold 400 bytes.*needs 404"),
        ({"shape": [8, 50]}, "needs 200"),
        ({"blocksize": 128}, "absmax has 13 values.*need 7"),
        ({"blocksize": 100}, "blocksize 100 is not allowed"),
        ({"quant_type": "fp4"}, "quant_type 'fp4' is not supported"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"shape": "8x100"}, "'shape' has the wrong type"),
        ({"shape": [8, "100"]}, "shape must be a list of ints"),
        ({"blocksize": None}, "lacks the field 'blocksize'"),
        ({"nested_blocksize": 100}, "nested blocksize 100 is not allowed"),
        ({"nested_offset": "x"}, "'nested_offset' has the wrong type"),
    ],
)
def test_quant_state_disagreeing_with_the_tensors(changes, message):
    sd = with_state(good_state_dict(), **changes)
    with pytest.raises(NF4FormatError, match=message):
        nf4core.nf4_from_state_dict(sd, "m")


def test_malformed_json_and_fp4_checkpoints():
    sd = good_state_dict()
    sd["m.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b'{"quant_type": nf4', np.uint8)
    with pytest.raises(NF4FormatError, match="not valid UTF-8 JSON"):
        nf4core.nf4_from_state_dict(sd, "m")
    sd["m.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"[1, 2]", np.uint8)
    with pytest.raises(NF4FormatError, match="must hold a JSON object"):
        nf4core.nf4_from_state_dict(sd, "m")
    sd = good_state_dict()
    sd["m.weight.quant_state.bitsandbytes__fp4"] = sd.pop("m.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(NF4FormatError, match="'fp4' is not supported"):
        nf4core.nf4_from_state_dict(sd, "m")


def test_tensors_of_the_wrong_size_or_dtype():
    sd = good_state_dict(double_quant=False)
    sd["m.weight.absmax"] = sd["m.weight.absmax"][:-1]
    with pytest.raises(NF4FormatError, match="absmax has 12 values.*need 13"):
        nf4core.nf4_from_state_dict(sd, "m")
    sd = good_state_dict(double_quant=False)
    sd["m.weight"] = sd["m.weight"].view(np.int8)
    with pytest.raises(NF4FormatError, match="must be uint8"):
        nf4core.nf4_from_state_dict(sd, "m")
    sd = good_state_dict()
    sd["m.weight.nested_quant_map"] = sd["m.weight.nested_quant_map"][:128]
    with pytest.raises(NF4FormatError, match="256 values"):
        nf4core.nf4_from_state_dict(sd, "m")
    sd = good_state_dict()
    sd["m.weight.quant_map"] = sd["m.weight.quant_map"].astype(np.float16)
    with pytest.raises(NF4FormatError, match="quant_map must be float32"):
        nf4core.nf4_from_state_dict(sd, "m")
