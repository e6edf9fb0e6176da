"""Readers refuse what they cannot honour, by name: chat templates that do not end, extra tensors,
stale shard indexes, config options we do not implement; write errors name the file."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from nf4core import ModelConfig, ModelLoadError, open_model
from nf4core import chat_template as ct
from nf4core.atomic import write_text_atomic
from nf4core.sources.safetensors_io import save_safetensors

from .tiny_models import hf_config, random_weights, write_gguf, write_hf_dir

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "source,problem",
    [
        ("{% include 'x' %}", r"line 1: \{% include %\} is not supported"),
        ("{% from 'x' import y %}", r"\{% import %\} is not supported"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nests calls more than 64 deep"),
        ("{{ 'x' * 10**9 }}", "builds a value of 1000000000 items"),
        ("{% set s = 'x' * 1000000 %}{{ s + s }}", "builds a value of 2000000 items"),
        ("{{ 2 ** 100000000 }}", "exponent 100000000 is too large"),
        ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
        ("{{ messages.__class__.__mro__ }}", "SecurityError"),
        ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "nested too deeply to parse"),
    ],
)
def test_chat_template_limits(source, problem):
    with pytest.raises(ct.ChatTemplateError, match=problem) as e:
        ct.render_chat(source, MESSAGES)
    assert "\n" not in str(e.value)


def test_chat_template_time_limit(monkeypatch):
    monkeypatch.setattr(ct, "RENDER_SECONDS", 0.2)
    nested = (
        "{% set s = 'x' * 1000 %}{% for a in s %}{% for b in s %}{% for c in s %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    )  # no call inside: only the timer stops it
    with pytest.raises(ct.ChatTemplateError, match="ran longer than 0.2s"):
        ct.render_chat(nested, MESSAGES)
    assert ct.render_chat("{{ messages[0].content }}", MESSAGES) == "hi"  # the timer is gone


def test_keyword_arguments_named_like_the_sandbox_parameters_still_work():
    source = (
        "{% macro f(obj, context) %}{{ obj }}{{ context }}{% endmacro %}{{ f(obj=1, context=2) }}"
    )
    assert ct.render_chat(source, MESSAGES) == "12"


def test_a_stored_lm_head_with_tied_embeddings_must_equal_them(tmp_path):
    config = hf_config("llama", tie=True)
    weights = random_weights(config)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    open_model(write_hf_dir(tmp_path / "same", config, weights))  # a redundant copy is fine
    weights["lm_head.weight"][0, 0] += 1
    with pytest.raises(ModelLoadError, match="tie_word_embeddings is true, but .* differs"):
        open_model(write_hf_dir(tmp_path / "differs", config, weights))


def test_unknown_tensors_are_refused_by_name(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    weights["model.layers.0.mlp.gate_proj.bias"] = np.zeros(96, np.float32)
    with pytest.raises(ModelLoadError, match="'model.layers.0.mlp.gate_proj.bias' is not part of"):
        open_model(write_hf_dir(tmp_path / "hf", config, weights))
    path = write_gguf(
        tmp_path / "m.gguf",
        config,
        random_weights(config),
        extra_tensors={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)},
    )
    with pytest.raises(ModelLoadError, match="'blk.0.attn_sinks.weight' is not part of"):
        open_model(path)


def test_a_shard_index_must_match_its_shards(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    directory = write_hf_dir(tmp_path / "hf", config, weights)
    (directory / "model.safetensors").rename(directory / "a.safetensors")
    norm = weights["model.norm.weight"]
    save_safetensors(directory / "b.safetensors", {"model.norm.weight": norm})
    index = {"weight_map": {name: "a.safetensors" for name in weights}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    open_model(directory)  # b.safetensors is not named by the index: not read
    index["weight_map"]["model.norm.weight"] = "b.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError,
        match="a.safetensors: holds tensor 'model.norm.weight', but "
        "model.safetensors.index.json assigns it to b",
    ):
        open_model(directory)
    index["weight_map"]["model.norm.weight"] = ["a.safetensors"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="weight_map values must be file names"):
        open_model(directory)


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"attention_dropout": 0.1}, "attention_dropout 0.1 is not supported"),
        ({"mlp_bias": "false"}, "mlp_bias must be true or false"),
        ({"model_type": "mistral", "mlp_bias": True}, "mlp_bias is supported for llama only"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0"),
        ({"head_dim": 15}, "head_dim must be a positive even int"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive int"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor must be"),
        ({"rope_scaling": "linear"}, "rope_scaling must be an object or null"),
        ({"bos_token_id": -1}, "bos_token_id must be a token id"),
    ],
)
def test_config_fields_are_checked(change, problem):
    with pytest.raises(ValueError, match=problem):
        ModelConfig.from_hf_config({**hf_config("llama"), **change})


def test_swish_is_silu():
    assert ModelConfig.from_hf_config({**hf_config("llama"), "hidden_act": "swish"})


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        write_text_atomic(tmp_path / "config.yaml", "x")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "config.yaml")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
