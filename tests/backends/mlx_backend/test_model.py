"""The MLX Llama/Qwen2 model vs transformers on the same dequantized weights; cache; checkpointing."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from mlx.utils import tree_flatten, tree_unflatten

from backends.engine import LoRASettings
from backends.mlx_backend.generate import generate
from backends.mlx_backend.lora import apply_lora
from backends.mlx_backend.model import CausalLM
from backends.mlx_backend.nf4_linear import NF4Linear
from backends.sampling import SamplingConfig
from nf4core.errors import ModelLoadError

from .tiny_models import random_tensors, tiny_config

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_logits(config, tensors, tokens):
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), missing
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def _quantized_copy(tensors, blocksize=64):
    """Every linear weight as an NF4Tensor; also the dequantized float32 weights for the oracle."""
    nf4, dense = {}, {}
    for name, value in tensors.items():
        if name.endswith("proj.weight"):
            t = nf4core.quantize(value, blocksize=blocksize, double_quant=True)
            nf4[name], dense[name] = t, nf4core.dequantize(t)
        else:
            nf4[name] = dense[name] = value
    return nf4, dense


@pytest.mark.parametrize(
    "architecture,overrides",
    [
        ("llama", {"rope_scaling": LLAMA3_SCALING}),
        ("qwen2", {}),
    ],
)
def test_logits_match_transformers(architecture, overrides):
    config = tiny_config(architecture, **overrides)
    nf4, dense = _quantized_copy(random_tensors(config, seed=1))
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 40))
    model = CausalLM.from_state(config, nf4)
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    got = np.array(model(mx.array(tokens)))
    want = _hf_logits(config, dense, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_kv_cache_matches_full_forward():
    config = tiny_config("llama")
    model = CausalLM.from_state(config, random_tensors(config, seed=3))
    tokens = mx.array(np.random.default_rng(4).integers(0, config.vocab_size, size=(1, 12)))
    full = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, :7], cache)] + [
        model(tokens[:, i : i + 1], cache) for i in range(7, 12)
    ]
    np.testing.assert_allclose(
        np.array(mx.concatenate(parts, axis=1)), np.array(full), rtol=1e-4, atol=1e-4
    )
    new = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=4))
    assert len(new) == 4


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    """With LoRA dropout too: the recomputed block must draw the same masks."""
    config = tiny_config("qwen2")
    model = CausalLM.from_state(config, random_tensors(config, seed=5))
    apply_lora(model, LoRASettings(r=4, seed=1, dropout=dropout))
    model.train()
    nonzero_b = [
        (k, mx.full(v.shape, 0.01))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith("lora_B")
    ]  # so that every adapter gets a gradient
    model.update(tree_unflatten(nonzero_b))
    tokens = mx.array(np.random.default_rng(6).integers(0, config.vocab_size, size=(2, 9)))

    def loss(params):
        model.update(params)
        return model(tokens).astype(mx.float32).square().mean()

    params = model.trainable_parameters()
    mx.random.seed(0)
    plain = tree_flatten(mx.grad(loss)(params))
    model.set_gradient_checkpointing(True)
    mx.random.seed(0)
    checkpointed = tree_flatten(mx.grad(loss)(params))
    assert [k for k, _ in plain] == [k for k, _ in checkpointed] and len(plain) == 2 * 7 * 2
    for (_, a), (_, b) in zip(plain, checkpointed):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
    assert any(float(mx.abs(g).max()) > 0 for _, g in plain)
    if dropout:  # the masks really are active
        train_loss = loss(params).item()
        model.eval()
        assert loss(params).item() != train_loss


def test_missing_tensor_is_named():
    config = tiny_config("llama")
    tensors = random_tensors(config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelLoadError, match="missing: model.layers.1.mlp.up_proj.weight"):
        CausalLM.from_state(config, tensors)


def test_bfloat16_compute_close_to_float32():
    config = tiny_config("llama")
    tensors = random_tensors(config, seed=7)
    tokens = mx.array(np.random.default_rng(8).integers(0, config.vocab_size, size=(1, 16)))
    f32 = CausalLM.from_state(config, tensors, compute_dtype="float32")(tokens)
    bf16 = CausalLM.from_state(config, tensors, compute_dtype="bfloat16")(tokens)
    assert bf16.dtype == mx.bfloat16
    diff = np.abs(np.array(bf16.astype(mx.float32)) - np.array(f32))
    assert diff.max() < 0.1 * np.abs(np.array(f32)).max()
