"""A tiny NF4 model trains on the CPU: the loss falls, runs are deterministic, accumulation is exact."""

import numpy as np
import pytest
import torch

import nf4core
from backends.engine import LoRASettings
from backends.schedule import learning_rate_at
from backends.torch_backend.cpu_matmul import force_cpu_matmul
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.model import CausalLM, causal_lm_loss
from backends.torch_backend.train_step import Batch, TrainConfig, Trainer

CFG = nf4core.ModelConfig(
    "llama",
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def tiny_state(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, f, v = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size
    kv = CFG.num_key_value_heads * CFG.resolved_head_dim
    shapes = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,)}
    for i in range(CFG.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (c, c),
                p + "self_attn.k_proj.weight": (kv, c),
                p + "self_attn.v_proj.weight": (kv, c),
                p + "self_attn.o_proj.weight": (c, c),
                p + "mlp.gate_proj.weight": (f, c),
                p + "mlp.up_proj.weight": (f, c),
                p + "mlp.down_proj.weight": (c, f),
                p + "input_layernorm.weight": (c,),
                p + "post_attention_layernorm.weight": (c,),
            }
        )
    return {
        k: (np.ones(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1])).astype(
            np.float32
        )
        for k, s in shapes.items()
    }


def data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (n, 16), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :6] = False  # a "prompt" that does not count
    return ids, mask


def run(steps=12, dropout=0.1, accum=1, seed=0):
    torch.manual_seed(seed)
    model = CausalLM.from_state(CFG, tiny_state(), quantize=True)
    apply_lora(model, LoRASettings(r=4, alpha=8, dropout=dropout, seed=seed))
    trainer = Trainer(model, TrainConfig(grad_accum_steps=accum, max_grad_norm=1.0))
    ids, mask = data()
    micro = [Batch(ids[i::accum], mask[i::accum]) for i in range(accum)]
    lrs = [learning_rate_at(s, 1e-2, 2, steps, "cosine") for s in range(steps)]
    losses = [trainer.train_step(micro, lr).loss for lr in lrs]
    return losses, trainer


def test_short_run_lowers_the_loss_and_is_deterministic():
    losses, trainer = run()
    assert losses[-1] < 0.7 * losses[0], losses
    again, _ = run()
    assert again == losses  # bit-identical on the CPU with a fixed seed
    ids, mask = data()
    model = trainer.model.eval()
    with torch.no_grad():
        summed, n = model.loss(ids, mask)
    assert float(summed / n) < losses[0]


def test_only_adapters_change():
    model = CausalLM.from_state(CFG, tiny_state(), quantize=True)
    apply_lora(model, LoRASettings(r=2))
    frozen = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "lora_" not in k and isinstance(v, torch.Tensor)
    }
    trainer = Trainer(model, TrainConfig())
    ids, mask = data()
    trainer.train_step([Batch(ids, mask)], 1e-2)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_accumulation_equals_one_big_batch():
    with force_cpu_matmul("float32"):  # exact in FP32; BF16 matmuls would differ in rounding
        one, _ = run(steps=3, dropout=0.0, accum=1)
        two, _ = run(steps=3, dropout=0.0, accum=2)
    assert np.allclose(one, two, rtol=1e-5, atol=1e-6)


def test_masked_loss_counts_only_targets():
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[True, False, True, False, True]])
    summed, n = causal_lm_loss(logits, ids, mask)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert n == 2 and torch.allclose(summed, ce[1] + ce[3])


def test_trainer_rejects_a_model_without_adapters():
    model = CausalLM.from_state(CFG, tiny_state(), quantize=True)
    with pytest.raises(ValueError, match="trainable"):
        Trainer(model, TrainConfig())
