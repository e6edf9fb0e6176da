"""Our adapters, exported under PEFT's key names, load into peft on the transformers model and give
the same logits (peft is the oracle of the adapter convention: A/B shapes, scale, rsLoRA)."""

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from backends.engine import LoRASettings
from backends.torch_backend.lora import apply_lora, lora_state_dict
from backends.torch_backend.model import CausalLM
from tests.backends.torch_backend.test_model import load_dequantized_into
from tests.backends.torch_backend.tiny_models import hf_model, state_of


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapters_load_into_peft_with_identical_logits(arch):
    hf, cfg = hf_model(arch, seed=5)
    ours = CausalLM.from_state(cfg, state_of(hf), quantize=True)
    load_dequantized_into(hf, ours)
    lora_cfg = LoRASettings(r=4, alpha=12.0, seed=3)
    apply_lora(ours, lora_cfg)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # B = 0 would make every adapter invisible
    peft_model = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=4,
            lora_alpha=12.0,
            lora_dropout=0.0,
            target_modules=list(lora_cfg.targets),
        ),
    )
    result = peft.set_peft_model_state_dict(peft_model, lora_state_dict(ours))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        want = peft_model(ids).logits
        got = ours(ids)
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapters matter
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
