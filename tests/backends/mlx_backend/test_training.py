"""A tiny QLoRA run on the MLX CPU path: the loss falls, runs repeat exactly, accumulation is exact."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten, tree_unflatten

from backends.engine import LoRASettings
from backends.mlx_backend.lora import apply_lora, lora_state_dict
from backends.mlx_backend.memory import (
    ModelWontFitError,
    check_fits,
    plan_from_config,
    plan_training,
)
from backends.mlx_backend.model import CausalLM
from backends.mlx_backend.paged_optimizer import PagedAdamWConfig
from backends.mlx_backend.train_step import (
    Batch,
    TrainConfig,
    Trainer,
    clip_by_global_norm,
    masked_cross_entropy,
)
from backends.schedule import learning_rate_at

from .tiny_models import random_tensors, tiny_config


def _model(dropout=0.0, seed=0):
    config = tiny_config("llama", num_hidden_layers=2)
    model = CausalLM.from_state(config, random_tensors(config, seed=seed), blocksize=64)
    apply_lora(model, LoRASettings(r=4, alpha=8.0, dropout=dropout, seed=seed))
    return model


def _data(n=4, t=17, vocab=97):
    """Learnable sequences (arithmetic progressions mod vocab) with the first 5 tokens as a prompt."""
    rng = np.random.default_rng(0)
    starts, steps = rng.integers(0, vocab, n), rng.integers(1, 4, n)
    tokens = (starts[:, None] + steps[:, None] * np.arange(t)[None, :]) % vocab
    mask = np.ones_like(tokens, dtype=np.float32)
    mask[:, :5] = 0
    return tokens, mask


def _mean_loss(model, batch: Batch) -> float:
    """Mean loss per target token with dropout off (what Engine.eval_loss sums)."""
    model.eval()
    summed, n = masked_cross_entropy(model(batch.inputs), batch.targets, batch.mask)
    return (summed / n).item()


def _run(steps=12, dropout=0.1, checkpointing=False):
    model = _model(dropout=dropout)
    tokens, mask = _data()
    config = TrainConfig(
        optimizer=PagedAdamWConfig(page_elements=256),
        grad_accum_steps=2,
        max_grad_norm=1.0,
        seed=3,
        gradient_checkpointing=checkpointing,
    )
    trainer = Trainer(model, config)
    batch = Batch.from_tokens(tokens, mask)
    before = _mean_loss(trainer.model, batch)
    halves = [Batch.from_tokens(tokens[:2], mask[:2]), Batch.from_tokens(tokens[2:], mask[2:])]
    lrs = [learning_rate_at(s, 2e-2, 2, steps, "cosine") for s in range(steps)]
    losses = [trainer.train_step(halves, lr)["loss"] for lr in lrs]
    return before, _mean_loss(trainer.model, batch), losses, lora_state_dict(model)


def test_training_lowers_the_loss_and_is_deterministic():
    before, after, losses, adapters = _run()
    assert after < 0.7 * before, (before, after, losses)
    _, after2, losses2, adapters2 = _run()
    assert losses == losses2 and after == after2  # bit for bit with a fixed seed on the CPU
    for key in adapters:
        np.testing.assert_array_equal(adapters[key], adapters2[key])
    assert all(k.startswith("base_model.model.model.layers.") for k in adapters)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapters


def test_accumulation_equals_one_large_batch():
    tokens, mask = _data()
    mask[1, 5:9] = 0  # unequal token counts per micro-batch
    trainer = Trainer(_model(), TrainConfig(compile=False, grad_accum_steps=2))
    b = trainer.model.trainable_parameters()
    nonzero = [(k, mx.full(v.shape, 0.02)) for k, v in tree_flatten(b) if k.endswith("lora_B")]
    trainer.model.update(tree_unflatten(nonzero))
    whole, loss_whole, n_whole = trainer.gradients([Batch.from_tokens(tokens, mask)])
    parts, loss_parts, n_parts = trainer.gradients(
        [Batch.from_tokens(tokens[:1], mask[:1]), Batch.from_tokens(tokens[1:], mask[1:])]
    )
    assert n_whole == n_parts == int(mask[:, 1:].sum())
    assert loss_parts == pytest.approx(loss_whole, rel=1e-5)
    for (k, a), (_, c) in zip(tree_flatten(whole), tree_flatten(parts)):
        np.testing.assert_allclose(np.array(a), np.array(c), rtol=1e-4, atol=1e-7, err_msg=k)


def test_masked_loss_ignores_masked_tokens():
    logits = mx.array(np.random.default_rng(1).standard_normal((1, 3, 5)).astype(np.float32))
    targets = mx.array([[1, 2, 3]])
    total, count = masked_cross_entropy(logits, targets, mx.array([[0.0, 1.0, 0.0]]))
    lp = logits[0, 1] - mx.logsumexp(logits[0, 1])
    assert count.item() == 1 and total.item() == pytest.approx(-lp[2].item(), rel=1e-6)
    with pytest.raises(ValueError, match="no tokens"):
        Trainer(_model(), TrainConfig(compile=False)).gradients(
            [Batch.from_tokens(np.ones((1, 4)), np.zeros((1, 4)))]
        )


def test_clipping():
    grads = {"a": mx.array([3.0, 4.0])}
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert float(mx.sqrt(mx.sum(clipped["a"] ** 2))) == pytest.approx(1.0, rel=1e-5)
    same, _ = clip_by_global_norm(grads, 10.0)
    np.testing.assert_array_equal(np.array(same["a"]), [3.0, 4.0])


def test_wont_fit_message():
    model = _model()
    plan = plan_training(model, batch_size=4, seq_len=512, checkpointing=False)
    assert plan.base_weights > 0 and plan.adapters > 0
    with pytest.raises(ModelWontFitError, match=r"needs about .* GiB .* memory limit"):
        check_fits(plan, limit_bytes=1 << 20)
    check_fits(plan, limit_bytes=plan.total + 1)
    before_loading = plan_from_config(model.config, LoRASettings(r=4), 4, 512, checkpointing=False)
    assert before_loading.adapters == plan.adapters
    assert before_loading.activations == plan.activations
    assert abs(before_loading.base_weights - plan.base_weights) < 0.02 * plan.base_weights
    with pytest.raises(ModelWontFitError, match="Try a smaller batch size"):
        Trainer(model, TrainConfig(memory_limit_bytes=1 << 20))


def test_bfloat16_run_with_checkpointing_trains():
    """bfloat16 compute and adapters (as on a Mac), float32 masters, gradient checkpointing."""
    config = tiny_config("qwen2")
    model = CausalLM.from_state(config, random_tensors(config), compute_dtype="bfloat16")
    apply_lora(model, LoRASettings(r=4), adapter_dtype="bfloat16")
    tokens, mask = _data()
    trainer = Trainer(
        model,
        TrainConfig(gradient_checkpointing=True, compile=False),
    )
    batch = Batch.from_tokens(tokens, mask)
    before = _mean_loss(trainer.model, batch)
    for _ in range(6):
        trainer.train_step([batch], 2e-2)
    assert _mean_loss(trainer.model, batch) < 0.5 * before
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == mx.bfloat16
    state = trainer.optimizer.state_dict()[0]
    assert state["model.layers.0.self_attn.q_proj.lora_A.master"].dtype == np.float32
