"""Hugging Face directories and GGUF files of the same tiny models read to the same config and tensors."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest

from nf4core import ModelLoadError, open_model
from nf4core.dtypes import bfloat16
from nf4core.sources import GGUFSource, HFDirSource
from nf4core.sources.gguf_file import llama3_rope_factors, unpermute_rope_rows

from .tiny_models import hf_config, random_weights, tiny_tokenizer, write_gguf, write_hf_dir


def core(config):
    return dataclasses.replace(config, extra={})


@pytest.mark.parametrize(
    "arch,tie", [("llama", False), ("llama", True), ("qwen2", True), ("mistral", False)]
)
def test_hf_dir_and_gguf_f32_agree_exactly(tmp_path, arch, tie):
    config = hf_config(arch, tie=tie)
    weights = random_weights(config)
    hf = open_model(write_hf_dir(tmp_path / "hf", config, weights))
    gg = open_model(write_gguf(tmp_path / "m.gguf", config, weights))
    assert isinstance(hf, HFDirSource) and isinstance(gg, GGUFSource)
    assert core(gg.config) == core(hf.config)
    assert hf.config.tie_word_embeddings is tie
    assert hf.config.attention_bias is (arch == "qwen2")
    assert gg.tensor_names() == hf.tensor_names() == list(weights)
    assert ("lm_head.weight" in hf.tensor_names()) is not tie
    for name in weights:
        np.testing.assert_array_equal(gg.read(name), weights[name], err_msg=name)
        np.testing.assert_array_equal(hf.read(name), weights[name], err_msg=name)


def test_llama_biases_read_alike_from_gguf_and_hf_dir(tmp_path):
    """attention_bias (q/k/v/o) and mlp_bias (gate/up/down) of a Llama: the GGUF config infers both
    from the tensors it holds, and every bias reads back as written."""
    config = hf_config("llama", attention_bias=True, mlp_bias=True)
    weights = random_weights(config)
    hf = open_model(write_hf_dir(tmp_path / "hf", config, weights))
    gg = open_model(write_gguf(tmp_path / "m.gguf", config, weights))
    assert hf.config.attention_bias and hf.config.mlp_bias
    assert core(gg.config) == core(hf.config)
    biases = [n for n in weights if n.endswith(".bias")]
    assert len(biases) == 7 * config["num_hidden_layers"]
    assert gg.tensor_names() == hf.tensor_names() == list(weights)
    for name in weights:
        np.testing.assert_array_equal(gg.read(name), weights[name], err_msg=name)
        np.testing.assert_array_equal(hf.read(name), weights[name], err_msg=name)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"])
def test_gguf_types_dequantize_like_gguf_and_unpermute(tmp_path, qtype):
    config = hf_config("llama")
    weights = random_weights(config, seed=1)
    source = open_model(write_gguf(tmp_path / "m.gguf", config, weights, qtype=qtype))
    q_name = "model.layers.1.self_attn.q_proj.weight"
    for name, w in weights.items():
        got = source.read(name)
        assert got.dtype == np.float32 and got.shape == w.shape
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)
            continue
        qt = gguf.GGMLQuantizationType[qtype]
        # each row is quantized on its own, so the row order does not change a row's values
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).reshape(w.shape)
        np.testing.assert_array_equal(got, expected, err_msg=name)
    if qtype == "F16":
        np.testing.assert_allclose(source.read(q_name), weights[q_name], rtol=1e-3, atol=1e-3)


def test_unpermute_restores_rows():
    # head_dim 4, one head: llama.cpp stores rows 0, 2, 1, 3 (pairs (i, i + d/2) adjacent)
    rows = np.array([[0.0], [2.0], [1.0], [3.0]], dtype=np.float32)
    assert unpermute_rope_rows(rows, 1).ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
    bias = np.arange(16, dtype=np.float32)
    from .tiny_models import llama_cpp_permute

    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(bias, 2), 2), bias)


def test_qwen2_gguf_rows_are_not_permuted(tmp_path):
    config = hf_config("qwen2", tie=True)
    weights = random_weights(config, seed=2)
    source = open_model(write_gguf(tmp_path / "q.gguf", config, weights))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"):
        np.testing.assert_array_equal(source.read(name), weights[name])


def test_gguf_llama3_rope_scaling_is_recognised(tmp_path):
    config = hf_config("llama")
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    freqs = llama3_rope_factors(500000.0, 16, scaling)
    assert freqs[0] == 1.0 and freqs[-1] == 32.0
    config["rope_theta"] = 500000.0
    path = write_gguf(
        tmp_path / "l3.gguf",
        config,
        random_weights(config),
        extra_tensors={"rope_freqs.weight": freqs},
    )
    source = open_model(path)
    assert source.config.rope_scaling == scaling
    hf = open_model(
        write_hf_dir(tmp_path / "hf", {**config, "rope_scaling": scaling}, random_weights(config))
    )
    assert core(source.config) == core(hf.config)
    # transformers >= 5 writes the same as rope_parameters
    v5 = {k: v for k, v in config.items() if k != "rope_theta"}
    v5["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    hf5 = open_model(write_hf_dir(tmp_path / "hf5", v5, random_weights(config)))
    assert core(hf5.config) == core(hf.config)
    assert "rope_parameters" not in hf5.config.extra
    assert "rope_freqs.weight" not in source.tensor_names()
    bad = write_gguf(
        tmp_path / "bad.gguf",
        config,
        random_weights(config),
        extra_tensors={"rope_freqs.weight": freqs * 1.5},
    )
    with pytest.raises(ModelLoadError, match="bad.gguf: rope_freqs.weight matches no known"):
        open_model(bad)


def test_bf16_hf_dir_is_read_as_bfloat16(tmp_path):
    config = hf_config("llama", torch_dtype="bfloat16")
    weights = random_weights(config, dtype=bfloat16)
    source = open_model(write_hf_dir(tmp_path / "hf", config, weights))
    assert source.dtype == "bfloat16"
    w = source.read("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == bfloat16
    np.testing.assert_array_equal(w, weights["model.layers.0.mlp.up_proj.weight"])
    assert not w.flags.writeable


def test_sharded_hf_dir_with_index(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    directory = write_hf_dir(tmp_path / "hf", config, {})
    (directory / "model.safetensors").unlink()
    from nf4core.sources.safetensors_io import save_safetensors

    names = list(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:7],
        "model-00002-of-00002.safetensors": names[7:],
    }
    for file, part in shards.items():
        save_safetensors(directory / file, {n: weights[n] for n in part})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = open_model(directory)
    for name in names:
        np.testing.assert_array_equal(source.read(name), weights[name])
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelLoadError, match="names shard 'model-00002-of-00002.safetensors', which is missing"
    ):
        open_model(directory)


def test_tokenizer_from_gguf_equals_tokenizer_json(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    tok = tiny_tokenizer()
    hf = open_model(write_hf_dir(tmp_path / "hf", config, weights, tok)).tokenizer()
    gg = open_model(write_gguf(tmp_path / "m.gguf", config, weights, tokenizer=tok)).tokenizer()
    for text in [
        "Hello world!",
        "def add(a, b):\n\treturn 12345",
        "naïve café 日本語",
        "<|im_start|>user\nhi<|im_end|>",
        "  spaces   and\n\nnewlines ",
    ]:
        assert gg.encode(text) == hf.encode(text) == tok.encode(text).ids, text
        assert gg.decode(gg.encode(text)) == text
    messages = [{"role": "user", "content": "hi"}]
    assert gg.apply_chat_template(messages, True) == hf.apply_chat_template(messages, True)
    assert (
        (gg.bos_token, gg.eos_token)
        == (hf.bos_token, hf.eos_token)
        == ("<|im_start|>", "<|im_end|>")
    )
