"""The chunked LM head + cross-entropy against the full logits path and numerical gradients."""

import pytest
import torch
import torch.nn.functional as F

from backends.engine import LoRASettings
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.model import CausalLM
from backends.torch_backend.model.chunked_loss import chunked_head_loss
from tests.backends.torch_backend.tiny_models import hf_model, state_of


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_loss_and_hidden_gradient_match_full_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    ids = torch.randint(0, 40, (3, 8))
    mask = torch.rand(3, 7) > 0.3
    got = chunked_head_loss(hidden, weight, ids, mask, chunk)
    got.backward()
    grad, hidden.grad = hidden.grad, None
    logits = hidden @ weight.T
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    want = torch.where(mask.flatten(), losses, 0.0).sum()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(grad, hidden.grad, rtol=1e-5, atol=1e-6)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_gradcheck_float64():
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    assert torch.autograd.gradcheck(lambda h: chunked_head_loss(h, weight, ids, mask, 3), (hidden,))


def test_a_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen LM head"):
        chunked_head_loss(
            torch.randn(1, 3, 4),
            torch.randn(5, 4, requires_grad=True),
            torch.zeros(1, 3, dtype=torch.long),
            torch.ones(1, 2, dtype=torch.bool),
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_loss_chunked_equals_full_with_lora_gradients(arch):
    pytest.importorskip("transformers")
    hf, cfg = hf_model(arch)
    model = CausalLM.from_state(cfg, state_of(hf), quantize=True)
    apply_lora(model, LoRASettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would give A no gradient
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :5] = False
    results = []
    for chunked in (False, True):
        model.chunked_loss = chunked
        model.zero_grad(set_to_none=True)
        summed, n = model.loss(ids, loss_mask)
        summed.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((summed.detach(), int(n), grads))
    (full, n_full, g_full), (chunk, n_chunk, g_chunk) = results
    assert n_full == n_chunk == 2 * 11 - 4
    assert torch.allclose(full, chunk, rtol=1e-5)
    for k in g_full:
        assert torch.allclose(g_full[k], g_chunk[k], rtol=1e-4, atol=1e-6), k
