"""transformers (and bitsandbytes) as the oracle: what we read and write matches what they load and save."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from safetensors import safe_open

import nf4core
from nf4core import NF4Tensor, dequantize, open_model, quantize_model
from nf4core.sources import BnbDirSource

# Rows are whole blocks: bitsandbytes 0.50.2's CPU path (dequantize_4bit without double quant, and
# the forward) mishandles rows that are not a whole number of blocks.
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _save_tiny(directory, arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            **SIZES, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-6
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**SIZES, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    with torch.no_grad():  # random biases: zero ones would hide a misplaced tensor
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    model.save_pretrained(directory)
    return model


def _to_numpy(t):
    return t.detach().float().numpy()


def assert_dequant_matches(t: NF4Tensor, theirs: np.ndarray, exact: bool) -> None:
    """bitsandbytes dequantizes to the stored dtype (bfloat16 here): ours rounded the same way is
    equal, up to the last-bit differences of double quant that the format contract allows."""
    mine = dequantize(t, t.dtype).astype(np.float32)
    if exact:
        np.testing.assert_array_equal(mine, theirs)
    else:
        np.testing.assert_allclose(mine, theirs, rtol=2**-7, atol=0)
        assert np.mean(mine == theirs) > 0.99


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reader_matches_transformers(tmp_path, arch):
    model = _save_tiny(tmp_path / "hf", arch)
    source = open_model(tmp_path / "hf")
    state = model.state_dict()
    expected = [k for k in state if not (arch == "qwen2" and k == "lm_head.weight")]
    assert sorted(source.tensor_names()) == sorted(expected)
    for name in expected:
        got = source.read(name)
        assert got.dtype == nf4core.dtypes.bfloat16, name
        np.testing.assert_array_equal(got.astype(np.float32), _to_numpy(state[name]), err_msg=name)
    c = source.config
    assert (c.architecture, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (
        arch,
        2,
        2,
        128,
    )
    assert c.tie_word_embeddings is (arch == "qwen2")
    assert c.attention_bias is (arch == "qwen2")
    if arch == "llama":
        assert (c.rope_theta, c.rms_norm_eps) == (500000.0, 1e-6)


def _bnb_config(double_quant=True):
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def test_bnb_directory_saved_by_transformers_loads_byte_identical(tmp_path):
    _save_tiny(tmp_path / "hf", "llama")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", quantization_config=_bnb_config(), device_map="cpu"
    )
    quantized.save_pretrained(tmp_path / "bnb")
    source = open_model(tmp_path / "bnb")
    assert isinstance(source, BnbDirSource)
    name = "model.layers.1.self_attn.k_proj.weight"
    with safe_open(tmp_path / "bnb" / "model.safetensors", "np") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    nf4_names = [n for n in source.tensor_names() if source.is_nf4(n)]
    assert len(nf4_names) == 14
    for n in source.tensor_names():
        value = source.read(n)
        if n not in nf4_names:
            assert isinstance(value, np.ndarray)
            continue
        assert isinstance(value, NF4Tensor) and value.double_quant is not None
        np.testing.assert_array_equal(value.packed, saved[n].reshape(-1))
        np.testing.assert_array_equal(value.double_quant.codes, saved[f"{n}.absmax"])
        np.testing.assert_array_equal(value.double_quant.scales, saved[f"{n}.nested_absmax"])
        np.testing.assert_array_equal(value.quant_map, saved[f"{n}.quant_map"])
    weight = quantized.model.layers[1].self_attn.k_proj.weight
    reference = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().numpy()
    assert_dequant_matches(source.read(name), reference, exact=False)


@pytest.mark.parametrize("double_quant", [False, True])
def test_our_directory_loads_in_transformers_bitsandbytes(tmp_path, double_quant):
    model = _save_tiny(tmp_path / "hf", "qwen2")
    with pytest.warns(UserWarning, match="no tokenizer saved"):  # transformers wrote none
        quantize_model(
            tmp_path / "hf",
            tmp_path / "nf4",
            blocksize=64,
            double_quant=double_quant,
            method="absmax",
        )  # bitsandbytes' quantizer: compared code for code below
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is double_quant
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    ours = open_model(tmp_path / "nf4")
    layer = loaded.model.layers[0]
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    for module, name in [
        (layer.mlp.down_proj, "model.layers.0.mlp.down_proj.weight"),
        (layer.self_attn.q_proj, "model.layers.0.self_attn.q_proj.weight"),
    ]:
        w, mine = module.weight, ours.read(name)
        np.testing.assert_array_equal(w.data.numpy().reshape(-1), mine.packed)
        assert (tuple(w.quant_state.shape), w.quant_state.blocksize) == (mine.shape, 64)
        np.testing.assert_array_equal(w.quant_state.code.numpy(), mine.quant_map)
        theirs = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().numpy()
        assert_dequant_matches(mine, theirs, exact=not double_quant)
    # the same weights quantized by bitsandbytes itself give the same codes (double quant off)
    if not double_quant:
        w = model.model.layers[0].mlp.down_proj.weight.data
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        mine = ours.read("model.layers.0.mlp.down_proj.weight")
        np.testing.assert_array_equal(mine.packed, packed.numpy().reshape(-1))
        np.testing.assert_array_equal(mine.absmax, state.absmax.numpy())
    # unquantized tensors arrive as saved (bias, norm, tied embedding)
    np.testing.assert_array_equal(
        _to_numpy(layer.self_attn.q_proj.bias),
        _to_numpy(model.model.layers[0].self_attn.q_proj.bias),
    )
    np.testing.assert_array_equal(
        _to_numpy(loaded.lm_head.weight), _to_numpy(model.model.embed_tokens.weight)
    )
    ids = torch.tensor([[1, 5, 9, 17]])
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
