import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nf4core
from nf4core.state_dict import nf4_to_state_dict

KEYS = [
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7, 63), (2, 3, 257)], ids=str)
def test_round_trip_through_a_safetensors_file(tmp_path, shape, double_quant):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = nf4core.quantize(w, 32, double_quant)
    sd = nf4_to_state_dict(t, "model.layers.3.self_attn.q_proj")
    expected = {"model.layers.3.self_attn.q_proj.weight" + k for k in KEYS}
    if not double_quant:
        expected -= {
            "model.layers.3.self_attn.q_proj.weight.nested_absmax",
            "model.layers.3.self_attn.q_proj.weight.nested_quant_map",
        }
    assert set(sd) == expected
    assert sd["model.layers.3.self_attn.q_proj.weight"].shape == ((w.size + 1) // 2, 1)
    save_file(sd, tmp_path / "model.safetensors")
    back = nf4core.nf4_from_state_dict(
        load_file(tmp_path / "model.safetensors"), "model.layers.3.self_attn.q_proj"
    )
    assert back.shape == shape and back.blocksize == 32 and back.dtype == "float32"
    assert nf4core.dequantize(back).tobytes() == nf4core.dequantize(t).tobytes()


def test_quant_state_json_fields():
    w = np.ones((4, 64), np.float16)
    state = json.loads(
        bytes(
            nf4_to_state_dict(nf4core.quantize(w, 64), "x")[
                "x.weight.quant_state.bitsandbytes__nf4"
            ]
        )
    )
    assert list(state) == [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    assert state["dtype"] == "float16" and state["shape"] == [4, 64]
    assert state["nested_offset"] == 1.0


def test_nf4_tensor_is_immutable():
    t = nf4core.quantize(np.ones(64, np.float32), double_quant=False)
    with pytest.raises(ValueError):
        t.packed[0] = 0
    with pytest.raises(AttributeError):
        t.blocksize = 32
