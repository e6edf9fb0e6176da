"""Adapters trained here load in PEFT (the ecosystem's format) and give the same logits."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from mlx.utils import tree_flatten, tree_unflatten

from backends.engine import LoRASettings
from backends.mlx_backend.lora import apply_lora, load_lora_state_dict, lora_state_dict
from backends.mlx_backend.model import CausalLM
from backends.peft_adapter import Adapter, load_adapter, save_adapter

from .tiny_models import random_tensors, tiny_config


def test_peft_loads_our_adapters_to_the_same_logits(tmp_path):
    config = tiny_config("qwen2")
    tensors = random_tensors(config, seed=21)
    nf4 = {
        k: nf4core.quantize(v, 64, True) if k.endswith("proj.weight") else v
        for k, v in tensors.items()
    }
    model = CausalLM.from_state(config, nf4)
    lora = LoRASettings(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    apply_lora(model, lora)
    rng = np.random.default_rng(22)
    trained = [
        (k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.1))
        for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten(trained))
    tokens = rng.integers(0, config.vocab_size, size=(1, 11))
    ours = np.array(model(mx.array(tokens)))
    adapter = Adapter(lora_state_dict(model), lora.r, lora.alpha, lora.dropout, lora.targets)
    save_adapter(tmp_path / "adapter", adapter)  # the pipeline's one writer

    dense = {
        k: nf4core.dequantize(v) if not isinstance(v, np.ndarray) else v for k, v in nf4.items()
    }
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in dense.items()}, strict=False)
    hf.tie_weights()
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)

    fresh = CausalLM.from_state(config, nf4)
    apply_lora(fresh, lora)
    loaded = load_adapter(tmp_path / "adapter")
    assert len(loaded.tensors) == 2 * 3 * config.num_hidden_layers
    load_lora_state_dict(fresh, loaded.tensors)
    np.testing.assert_array_equal(np.array(fresh(mx.array(tokens))), ours)
