"""Mistral's `sliding_window` in ModelConfig and through the sources that read or write it."""

from __future__ import annotations

import json

import pytest

from nf4core import ModelConfig, ModelLoadError, open_model, quantize_model

from .test_model_config import LLAMA
from .tiny_models import hf_config, random_weights, write_gguf, write_hf_dir

MISTRAL = {**LLAMA, "model_type": "mistral", "rope_scaling": None, "sliding_window": 4096}

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer saved")  # tiny models without one


def test_mistral_window_is_read_and_written_back():
    config = ModelConfig.from_hf_config(MISTRAL)
    assert config.sliding_window == 4096 and "sliding_window" not in config.extra
    written = config.to_hf_config()
    assert written["sliding_window"] == 4096
    assert ModelConfig.from_hf_config(written) == config


@pytest.mark.parametrize("raw,window", [({"sliding_window": None}, None), ({}, 4096)])
def test_a_null_window_is_none_and_a_missing_one_is_transformers_default(raw, window):
    fields = {k: v for k, v in MISTRAL.items() if k != "sliding_window"}
    config = ModelConfig.from_hf_config({**fields, **raw})
    assert config.sliding_window == window
    written = config.to_hf_config()  # always written: transformers reads a missing key as 4096
    assert "sliding_window" in written and written["sliding_window"] == window
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoConfig.for_model(**fields, **raw).sliding_window == window
    assert transformers.AutoConfig.for_model(**written).sliding_window == window


def test_transformers_reads_our_window():
    transformers = pytest.importorskip("transformers")
    ours = ModelConfig.from_hf_config({**MISTRAL, "sliding_window": 7})
    theirs = transformers.AutoConfig.for_model(**ours.to_hf_config())
    assert theirs.sliding_window == 7
    assert ModelConfig.from_hf_config(theirs.to_dict()).sliding_window == 7


def test_qwen2_sliding_window_layers_are_refused():
    qwen2 = {**LLAMA, "model_type": "qwen2", "sliding_window": 4096, "max_window_layers": 28}
    with pytest.raises(ValueError, match="Qwen2 sliding-window layers .* not supported"):
        ModelConfig.from_hf_config({**qwen2, "use_sliding_window": True})
    config = ModelConfig.from_hf_config({**qwen2, "use_sliding_window": False})
    assert config.sliding_window is None  # an unused window stays in `extra`, written as it was
    assert config.to_hf_config()["sliding_window"] == 4096


@pytest.mark.parametrize(
    "window, message",
    [
        (0, "sliding_window must be a positive int or None"),
        (-3, "sliding_window must be a positive int or None"),
        (2.5, "sliding_window must be a positive int or None"),
        (True, "sliding_window must be a positive int or None"),
        ("4096", "sliding_window must be a positive int or None"),
    ],
)
def test_bad_windows_are_rejected(window, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**MISTRAL, "sliding_window": window})


def test_a_window_on_llama_is_rejected():
    config = ModelConfig.from_hf_config(MISTRAL)
    with pytest.raises(ValueError, match="sliding_window is supported for mistral only"):
        ModelConfig(**{**config.__dict__, "architecture": "llama"})


def test_quantized_directory_and_gguf_keep_the_window(tmp_path):
    config = hf_config("mistral", sliding_window=4)
    weights = random_weights(config)
    out = quantize_model(write_hf_dir(tmp_path / "hf", config, weights), tmp_path / "nf4")
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    assert open_model(out).config.sliding_window == 4
    windowed = write_gguf(
        tmp_path / "w.gguf", config, weights, add_metadata=lambda w: w.add_sliding_window(4)
    )
    assert open_model(windowed).config.sliding_window == 4
    plain = write_gguf(tmp_path / "n.gguf", config, weights)
    assert open_model(plain).config.sliding_window == 4096  # as a config.json without the key
    none = write_gguf(
        tmp_path / "z.gguf", config, weights, add_metadata=lambda w: w.add_sliding_window(0)
    )
    assert open_model(none).config.sliding_window is None


def test_a_window_in_a_llama_gguf_is_refused(tmp_path):
    config = hf_config("llama")
    path = write_gguf(
        tmp_path / "l.gguf",
        config,
        random_weights(config),
        add_metadata=lambda w: w.add_sliding_window(4),
    )
    with pytest.raises(ModelLoadError, match="sliding_window is supported for mistral only"):
        open_model(path)
