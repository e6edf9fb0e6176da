"""Llama's `attention_bias` (q/k/v/o biases) and `mlp_bias` (gate/up/down biases) on both backends,
against transformers as the oracle, and strict loading: a builder uses every tensor of the state or
refuses it in one line naming the tensors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nf4core  # noqa: E402
from backends.engine import BaseWeights, LoRASettings  # noqa: E402
from backends.merge import merge  # noqa: E402
from backends.peft_adapter import Adapter  # noqa: E402
from backends.registry import (
    build_engine,  # noqa: E402
    select_backend,  # noqa: E402
)
from nf4core.errors import ModelLoadError  # noqa: E402
from tests.nf4core.tiny_models import tiny_tokenizer  # noqa: E402

HAVE_MLX = importlib.util.find_spec("mlx") is not None
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not HAVE_MLX, reason="no mlx"))]
SIZES = dict(
    vocab_size=300,  # the tiny tokenizer's
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
BIASES = [  # (attention_bias, mlp_bias, tie_word_embeddings)
    (True, False, False),
    (False, True, True),
    (True, True, False),
]


def _hf_model(attention_bias: bool, mlp_bias: bool, tie: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **SIZES, attention_bias=attention_bias, mlp_bias=mlp_bias, tie_word_embeddings=tie
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # random biases: zero ones would hide a dropped tensor
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=BIASES, ids=lambda b: "attn{:d}-mlp{:d}-tie{:d}".format(*b))
def saved(request, tmp_path_factory):
    model = _hf_model(*request.param)
    directory = tmp_path_factory.mktemp("biased")
    model.save_pretrained(directory)
    tiny_tokenizer(SIZES["vocab_size"]).save(str(directory / "tokenizer.json"))
    return model, directory


def _logits(engine, ids: np.ndarray) -> np.ndarray:
    if engine.choice.backend == "torch":
        with torch.no_grad():
            return engine.model(torch.from_numpy(ids)).float().numpy()
    from backends.mlx_backend._mlx import mx

    return np.array(engine.model(mx.array(ids)).astype(mx.float32))


def _engine(backend: str, directory, base: str):
    choice = select_backend(backend, "cpu", "float32")
    source = nf4core.open_model(directory)
    return build_engine(choice, source, LoRASettings(), None, 1e-4, BaseWeights(base))


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, 12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_base_matches_transformers(saved, backend):
    model, directory = saved
    names = {n for n, _ in model.named_parameters()}
    assert any(n.endswith(".bias") for n in names)
    want = _hf_logits(model, IDS)
    got = _logits(_engine(backend, directory, "float32"), IDS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_base_matches_transformers_on_dequantized_weights(saved, backend):
    model, directory = saved
    oracle = _hf_model(
        model.config.attention_bias, model.config.mlp_bias, model.config.tie_word_embeddings
    )
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if nf4core.sources.is_quantized_linear(name):
                t = nf4core.quantize(p.numpy(), blocksize=64, double_quant=True)
                p.copy_(torch.from_numpy(nf4core.dequantize(t, np.float32)))
    want = _hf_logits(oracle, IDS)
    got = _logits(_engine(backend, directory, "nf4"), IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert np.abs(want - _hf_logits(model, IDS)).max() > 1e-3  # NF4 really changed the weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_merged_model_carries_the_biases(saved, backend, tmp_path):
    """Adapters trained on the NF4 base, merged into a float32 directory: transformers computes
    from it the logits our engine computes from base + adapters (biases and all)."""
    _, directory = saved
    lora = LoRASettings(r=4, alpha=8.0)
    engine = build_engine(
        select_backend(backend, "cpu", "float32"),
        nf4core.open_model(directory),
        lora,
        None,
        1e-4,
        BaseWeights("nf4"),
    )
    rng = np.random.default_rng(1)
    adapters = {
        k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32)
        for k, v in engine.adapters().items()
    }
    engine.load_adapters(adapters)
    merged = merge(
        directory, Adapter(adapters, 4, 8.0, 0.0, lora.targets), tmp_path / "m", "float32"
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    biases = {n for n, _ in hf.named_parameters() if n.endswith(".bias")}
    assert biases == {
        n for n in nf4core.open_model(directory).tensor_names() if n.endswith(".bias")
    }
    np.testing.assert_allclose(_logits(engine, IDS), _hf_logits(hf, IDS), atol=2e-4, rtol=1e-4)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _builders():
    from backends.torch_backend.model import CausalLM

    out = [("torch", lambda config, tensors: CausalLM.from_state(config, tensors, quantize=False))]
    if HAVE_MLX:
        from backends.mlx_backend.model import CausalLM as MLXCausalLM

        out.append(
            (
                "mlx",
                lambda config, tensors: MLXCausalLM.from_state(
                    config, tensors, quantize=False, compute_dtype="float32"
                ),
            )
        )
    return out


def _config(**overrides) -> nf4core.ModelConfig:
    return nf4core.ModelConfig("llama", **{**SIZES, **overrides})


@pytest.mark.parametrize(
    "backend,build", _builders(), ids=lambda b: b if isinstance(b, str) else ""
)
def test_a_bias_the_config_does_not_describe_is_refused_in_one_line(backend, build):
    state = _state(_hf_model(True, False, False))  # o_proj biases and all
    with pytest.raises(ModelLoadError) as info:
        build(_config(attention_bias=False), state)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "model state: unexpected tensors: model.layers.0.self_attn.q_proj.bias"
    )
    assert "(+5 more)" in message and "attention_bias=False" in message


@pytest.mark.parametrize(
    "backend,build", _builders(), ids=lambda b: b if isinstance(b, str) else ""
)
def test_a_bias_the_config_describes_must_be_there(backend, build):
    state = _state(_hf_model(False, False, False))
    with pytest.raises(ModelLoadError) as info:
        build(_config(mlp_bias=True), state)
    message = str(info.value)
    assert "\n" not in message
    assert "missing: model.layers.0.mlp.gate_proj.bias, model.layers.0.mlp.up_proj.bias" in message
    assert "(+3 more)" in message and "unexpected" not in message


@pytest.mark.parametrize(
    "backend,build", _builders(), ids=lambda b: b if isinstance(b, str) else ""
)
def test_a_tensor_the_builder_leaves_unread_is_refused(backend, build, monkeypatch):
    """The regression the strict loader exists for: a builder that drops o_proj.bias (as both did)
    now fails naming it, instead of computing other logits."""
    module = (
        "backends.torch_backend.model.llama" if backend == "torch" else "backends.mlx_backend.model"
    )
    monkeypatch.setattr(f"{module}.attention_has_bias", lambda config, proj: proj != "o_proj")
    state = _state(_hf_model(True, False, False))
    with pytest.raises(
        ModelLoadError,
        match=r"^model state: unexpected tensors: "
        r"model\.layers\.0\.self_attn\.o_proj\.bias, "
        r"model\.layers\.1\.self_attn\.o_proj\.bias \(config",
    ):
        build(_config(attention_bias=True), state)


@pytest.mark.parametrize(
    "backend,build", _builders(), ids=lambda b: b if isinstance(b, str) else ""
)
def test_tied_head_and_saved_inv_freq_are_ignored(backend, build):
    model = _hf_model(False, False, True)
    state = _state(model)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # what a tied checkpoint may hold
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    built = build(_config(tie_word_embeddings=True), state)
    assert built is not None


@pytest.mark.parametrize(
    "backend,build", _builders(), ids=lambda b: b if isinstance(b, str) else ""
)
def test_a_wrong_shape_is_named(backend, build):
    state = _state(_hf_model(False, False, False))
    state["model.layers.1.mlp.down_proj.weight"] = np.zeros((64, 100), np.float32)
    with pytest.raises(
        ModelLoadError,
        match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight "
        r"has shape \[64, 100\], expected \[64, 128\]",
    ):
        build(_config(), state)


def test_a_bias_in_the_directory_the_config_does_not_describe_is_refused(tmp_path):
    model = _hf_model(False, True, False)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"mlp_bias": true', '"mlp_bias": false')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="mlp.down_proj.bias' is not part of the llama model"):
        nf4core.open_model(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_tensor_of_a_directory_names_its_file(saved, backend, monkeypatch):
    model, directory = saved
    if not model.config.attention_bias:
        pytest.skip("no o_proj bias to drop")
    module = (
        "backends.torch_backend.model.llama" if backend == "torch" else "backends.mlx_backend.model"
    )
    monkeypatch.setattr(f"{module}.attention_has_bias", lambda config, proj: proj != "o_proj")
    with pytest.raises(ModelLoadError) as info:
        _engine(backend, directory, "float32")
    assert str(info.value).startswith(
        f"{directory / 'model.safetensors'}: unexpected tensors: "
        "model.layers.0.self_attn.o_proj.bias, model.layers.1.self_attn.o_proj.bias (config: llama"
    )
