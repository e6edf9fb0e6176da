"""Our model against transformers on the same (dequantized) weights, the KV cache, checkpointing."""

import pytest
import torch

pytest.importorskip("transformers")

from backends.engine import LoRASettings
from backends.torch_backend.generate import SamplingConfig, generate
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear
from tests.backends.torch_backend.tiny_models import hf_model, state_of


def load_dequantized_into(hf, ours: CausalLM) -> None:
    """Give the transformers model exactly the weights our NF4 layers hold."""
    dense = {
        f"{name}.weight": m.dequantize()
        for name, m in ours.named_modules()
        if isinstance(m, NF4Linear)
    }
    _missing, unexpected = hf.load_state_dict(dense, strict=False)
    assert not unexpected and len(dense) == 7 * ours.config.num_hidden_layers


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    hf, cfg = hf_model(request.param)
    ours = CausalLM.from_state(cfg, state_of(hf), quantize=True, blocksize=64)
    load_dequantized_into(hf, ours)
    return hf, ours


def test_logits_match_transformers_on_dequantized_weights(pair):
    hf, ours = pair
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_dense_build_matches_transformers():
    hf, cfg = hf_model("qwen2", seed=3)
    ours = CausalLM.from_state(cfg, state_of(hf), quantize=False)
    assert not any(isinstance(m, NF4Linear) for m in ours.modules())
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=2e-4, rtol=1e-4)


def test_tied_embeddings_share_one_tensor(pair):
    _, ours = pair
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == ours.config.tie_word_embeddings


def test_kv_cache_matches_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 16)
        parts = [ours(ids[:, :5], cache), ours(ids[:, 5:8], cache)]  # prefill, then a chunk
        parts += [ours(ids[:, t : t + 1], cache) for t in range(8, 12)]  # then single tokens
    assert cache.length == 12
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        ours(ids[:, :5], cache)


def test_greedy_generation_with_cache_equals_recomputing(pair):
    _, ours = pair
    prompt = [3, 17, 42, 5]
    got = generate(ours, prompt, SamplingConfig(max_new_tokens=6))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt) :]
    sampled = [
        generate(ours, prompt, SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=s))
        for s in (1, 1)
    ]
    assert sampled[0] == sampled[1]


def test_gradient_checkpointing_gives_the_same_gradients():
    hf, cfg = hf_model("llama", seed=1)
    ours = CausalLM.from_state(cfg, state_of(hf))
    apply_lora(ours, LoRASettings(r=4))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    ours.train()
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        ours.zero_grad()
        ours(ids).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2 * 2 // 2
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_generation_stops_at_eos_and_validates(pair):
    _, ours = pair
    prompt = [3, 17, 42, 5]
    first = generate(ours, prompt, SamplingConfig(max_new_tokens=1))[0]
    assert generate(ours, prompt, SamplingConfig(max_new_tokens=5, eos_token_ids=(first,))) == [
        first
    ]
    assert generate(ours, prompt, SamplingConfig(max_new_tokens=0)) == []
    for bad in (dict(max_new_tokens=-1), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="prompt"):
        generate(ours, [], SamplingConfig())


def test_checkpoint_recompute_leaves_out_only_the_down_projections_base_matmul(monkeypatch):
    """Backward of a checkpointed layer recomputes six of its seven frozen base matmuls: the down
    projection's output is never read there, only the input it saves."""
    import backends.torch_backend.lora_nf4 as lora_nf4

    hf, cfg = hf_model("llama", seed=2)
    ours = CausalLM.from_state(cfg, state_of(hf))
    apply_lora(ours, LoRASettings(r=4))
    ours.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    real, shapes = lora_nf4.base_matmul, []

    def counting(rows, weight, matmul_dtype):
        shapes.append(tuple(weight.shape))
        return real(rows, weight, matmul_dtype)

    monkeypatch.setattr(lora_nf4, "base_matmul", counting)
    calls = {}
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        shapes.clear()
        ours(ids).square().mean().backward()
        calls[ckpt] = list(shapes)
    layers = cfg.num_hidden_layers
    down = (cfg.hidden_size, cfg.intermediate_size)
    assert len(calls[False]) == 7 * layers
    assert len(calls[True]) == 7 * layers + 6 * layers
    assert calls[True].count(down) == layers
    assert not any(m.output_unused for m in ours.modules() if hasattr(m, "output_unused"))
