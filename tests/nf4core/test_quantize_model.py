"""Streaming quantization into a bitsandbytes directory: contents, memory discipline, atomicity."""

from __future__ import annotations

import dataclasses
import json
import weakref

import numpy as np
import pytest

from nf4core import NF4Tensor, dequantize, iter_quantized, open_model, quantize, quantize_model
from nf4core.dtypes import bfloat16
from nf4core.model_quantize import DEFAULT_QUANT_METHOD
from nf4core.sources import is_quantized_linear
from nf4core.sources.safetensors_io import SafetensorsFile

from .tiny_models import hf_config, random_weights, tiny_tokenizer, write_gguf, write_hf_dir

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer saved")  # tiny models without one


class TrackingSource:
    """Wraps a source and records how many arrays it returned are still alive at each read."""

    def __init__(self, inner):
        self.inner = inner
        self.alive = 0
        self.max_alive = 0
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _gone(self):
        self.alive -= 1

    def read(self, name):
        value = self.inner.read(name)
        self.alive += 1
        self.reads += 1
        self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(value, self._gone)
        return value


def test_quantize_holds_one_source_tensor_at_a_time(tmp_path):
    config = hf_config("llama")
    source = open_model(write_gguf(tmp_path / "m.gguf", config, random_weights(config), "Q8_0"))
    tracking = TrackingSource(source)
    quantize_model(tracking, tmp_path / "out")
    assert tracking.reads == len(source.tensor_names())
    assert tracking.max_alive == 1
    assert tracking.alive == 0


def test_quantized_directory_contents(tmp_path):
    config = hf_config("llama", torch_dtype="bfloat16")
    weights = random_weights(config, dtype=bfloat16, seed=3)
    out = quantize_model(
        write_hf_dir(tmp_path / "hf", config, weights, tiny_tokenizer()),
        tmp_path / "nf4",
        blocksize=128,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert saved["quantization_config"]["bnb_4bit_use_double_quant"] is True
    reread = open_model(out)
    original = open_model(tmp_path / "hf").config
    assert dataclasses.replace(reread.config, extra={}) == dataclasses.replace(original, extra={})
    for name, w in weights.items():
        value = reread.read(name)
        if is_quantized_linear(name):
            expected = quantize(w, 128, double_quant=True, method=DEFAULT_QUANT_METHOD)
            assert isinstance(value, NF4Tensor) and value.blocksize == 128
            np.testing.assert_array_equal(value.packed, expected.packed)
            np.testing.assert_array_equal(dequantize(value), dequantize(expected))
        else:
            assert value.dtype == bfloat16
            np.testing.assert_array_equal(value, w)
    file = SafetensorsFile(out / "model.safetensors")
    assert file.metadata["format"] == "pt" and file.metadata["nf4core_format_version"] == "1"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied as they were
        assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    assert "model.layers.0.mlp.up_proj.weight.nested_absmax" in file
    assert reread.tokenizer().encode("Hello world!") == tiny_tokenizer().encode("Hello world!").ids


def test_requantizing_a_bnb_directory_copies_nf4_bytes(tmp_path):
    config = hf_config("llama")
    first = quantize_model(
        write_hf_dir(tmp_path / "hf", config, random_weights(config)),
        tmp_path / "a",
        double_quant=False,
    )
    second = quantize_model(first, tmp_path / "b", blocksize=256, double_quant=True)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (
        json.loads((second / "config.json").read_text())["quantization_config"][
            "bnb_4bit_use_double_quant"
        ]
        is False
    )


def test_failure_leaves_nothing_behind(tmp_path):
    config = hf_config("llama")
    source = open_model(write_hf_dir(tmp_path / "hf", config, random_weights(config)))

    class Failing(TrackingSource):
        def read(self, name):
            if name == "model.layers.1.mlp.up_proj.weight":
                raise OSError("disk on fire")
            return super().read(name)

    (tmp_path / "work").mkdir()
    with pytest.raises(OSError, match="disk on fire"):
        quantize_model(Failing(source), tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []


def test_refuses_a_non_empty_output_directory(tmp_path):
    config = hf_config("llama")
    hf = write_hf_dir(tmp_path / "hf", config, random_weights(config))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out: exists and is not an empty directory"):
        quantize_model(hf, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="blocksize 48 is not allowed"):
        quantize_model(hf, tmp_path / "other", blocksize=48)


def test_iter_quantized_for_quantize_on_load(tmp_path):
    config = hf_config("qwen2", tie=True)
    weights = random_weights(config, seed=4)
    tracking = TrackingSource(open_model(write_hf_dir(tmp_path / "hf", config, weights)))
    names = []
    for name, value in iter_quantized(tracking, blocksize=32, double_quant=False):
        names.append(name)
        if is_quantized_linear(name):
            assert (
                isinstance(value, NF4Tensor) and value.blocksize == 32 and value.absmax is not None
            )
            expected = quantize(weights[name].astype(bfloat16), 32, False, DEFAULT_QUANT_METHOD)
            np.testing.assert_array_equal(value.packed, expected.packed)
        else:
            assert value.dtype == bfloat16  # float32 sources are kept in bfloat16
            np.testing.assert_array_equal(value, weights[name].astype(bfloat16))
        del value
    assert names == list(weights) and tracking.max_alive == 1
