"""DoRA on torch against peft (the oracle): the same layer output, gradients and initial magnitude on
the same (dequantized NF4) weights, dropout included; and the whole model's logits."""

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from backends.engine import LoRASettings
from backends.torch_backend.lora import LoRALinear, apply_lora, lora_state_dict
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear
from tests.backends.torch_backend.test_model import load_dequantized_into
from tests.backends.torch_backend.tiny_models import hf_model, state_of


class _One(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _pair(dropout: float):
    """(our DoRA layer on an NF4 base, peft's DoRA layer on its dequantized weight), same adapters."""
    torch.manual_seed(0)
    dense = nn.Linear(48, 40, bias=True)
    nf4 = NF4Linear.from_linear(dense)
    ref = nn.Linear(48, 40, bias=True)
    with torch.no_grad():
        ref.weight.copy_(nf4.dequantize())
        ref.bias.copy_(dense.bias)
    settings = LoRASettings(r=4, alpha=8.0, dropout=dropout, targets=("proj",), use_dora=True)
    ours = LoRALinear.from_base(nf4, "proj", settings)
    theirs = peft.get_peft_model(
        _One(ref),
        peft.LoraConfig(
            r=4, lora_alpha=8.0, lora_dropout=dropout, target_modules=["proj"], use_dora=True
        ),
    )
    layer = theirs.base_model.model.proj
    # peft initialises the magnitude as ||W||_row of the base it wraps; ours from the NF4 weight
    torch.testing.assert_close(
        ours.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=0
    )
    with torch.no_grad():
        ours.lora_A.weight.normal_(std=0.3)
        ours.lora_B.weight.normal_(std=0.3)
        ours.lora_magnitude_vector.mul_(torch.rand(40) + 0.5)
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return ours, theirs, layer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_layer_matches_peft_output_and_gradients(dropout):
    ours, theirs, layer = _pair(dropout)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, 48)
    torch.manual_seed(7)  # the same dropout mask on both sides: one draw each, same shape
    got = ours(x)
    torch.manual_seed(7)
    want = theirs(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    pairs = [
        (ours.lora_A.weight, layer.lora_A["default"].weight),
        (ours.lora_B.weight, layer.lora_B["default"].weight),
        (ours.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight),
    ]
    for mine, ref in pairs:  # the norm is detached on both sides, or these differ
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-4, rtol=1e-4)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        plain = ours.base(x)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(x), plain, atol=1e-2)  # DoRA changes the output


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dora_model_loads_into_peft_with_identical_logits(arch):
    hf, cfg = hf_model(arch, seed=5)
    ours = CausalLM.from_state(cfg, state_of(hf), quantize=True)
    load_dequantized_into(hf, ours)
    settings = LoRASettings(r=4, alpha=12.0, seed=3, use_dora=True)
    apply_lora(ours, settings)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    peft_model = peft.get_peft_model(
        hf,
        peft.LoraConfig(r=4, lora_alpha=12.0, target_modules=list(settings.targets), use_dora=True),
    )
    state = lora_state_dict(ours)
    assert any(k.endswith(".lora_magnitude_vector") for k in state)
    result = peft.set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        want = peft_model(ids).logits
        got = ours(ids)
        with peft_model.disable_adapter():
            plain = peft_model.get_base_model()(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
