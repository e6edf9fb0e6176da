import numpy as np
import pytest
import torch
from torch import nn

import nf4core
from backends.engine import LoRASettings
from backends.torch_backend.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
)
from backends.torch_backend.nf4_linear import NF4Linear
from tests.backends.torch_backend.conftest import bits, quantized


def nf4_layer(rng, out_f=12, in_f=20, bias=True):
    _, t = quantized(rng, (out_f, in_f), 32)
    return NF4Linear.from_nf4(t, rng.standard_normal(out_f) if bias else None)


def test_from_base_uses_the_seeded_nf4core_init(rng):
    base = nf4_layer(rng)
    lora = LoRALinear.from_base(base, "model.layers.0.self_attn.q_proj", LoRASettings(r=4, seed=7))
    a, b = nf4core.lora_init("model.layers.0.self_attn.q_proj", 20, 12, 4, 7)
    assert np.array_equal(bits(lora.lora_A.weight), bits(a))
    assert np.array_equal(lora.lora_B.weight.detach().numpy(), b)
    x = torch.randn(3, 20)
    assert torch.equal(lora(x), base(x))  # B = 0: the adapter starts as the identity


def test_scale_and_forward_formula(rng):
    base = nf4_layer(rng)
    cfg = LoRASettings(r=4, alpha=8.0)
    assert cfg.scale == 2.0
    lora = LoRALinear.from_base(base, "m", cfg)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(2, 20)
    a, b = lora.lora_A.weight, lora.lora_B.weight
    assert torch.allclose(lora(x), base(x) + cfg.scale * (x @ a.T @ b.T), atol=1e-5)


def test_dropout_only_in_training(rng):
    lora = LoRALinear.from_base(nf4_layer(rng), "m", LoRASettings(r=2, dropout=0.5))
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(64, 20)
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    lora.train()
    torch.manual_seed(0)
    y1 = lora(x)
    torch.manual_seed(0)
    assert torch.equal(y1, lora(x))  # seeded: reproducible
    assert not torch.allclose(y1, lora(x))


def tiny_stack(rng):
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(2):
        block = nn.Module()
        block.q_proj = nf4_layer(rng, 16, 16)
        block.v_proj = nf4_layer(rng, 16, 16)
        block.norm = nn.LayerNorm(16)
        model.layers.append(block)
    return model


def test_apply_lora_targets_by_name_and_freezes_the_rest(rng):
    model = tiny_stack(rng)
    names = apply_lora(model, LoRASettings(r=2, targets=("q_proj",)))
    assert names == ["layers.0.q_proj", "layers.1.q_proj"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"layers.{i}.q_proj.lora_{m}.weight" for i in (0, 1) for m in "AB"]
    with pytest.raises(ValueError, match="no linear"):
        apply_lora(tiny_stack(rng), LoRASettings(targets=("nope",)))


def test_peft_key_names_round_trip(rng):
    model = tiny_stack(rng)
    apply_lora(model, LoRASettings(r=2))
    state = lora_state_dict(model)
    assert "base_model.model.layers.0.q_proj.lora_A.weight" in state
    assert state["base_model.model.layers.1.v_proj.lora_B.weight"].shape == (16, 2)
    changed = {k: torch.randn_like(v) for k, v in state.items()}
    load_lora_state_dict(model, changed)
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in changed.items())
    with pytest.raises(KeyError):
        load_lora_state_dict(model, {})


def test_config_validation():
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(r=True), dict(targets=())):
        with pytest.raises(ValueError):
            LoRASettings(**bad)
