"""Packed rows (several examples end to end, nf4core.batches(packing=True)) on MLX behave as on torch
and as the examples run one by one: RoPE positions restart, attention stays within an example (and
within Mistral's window), the first token of an example is not predicted from the one before."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="no mlx")

import nf4core  # noqa: E402
from backends.engine import BaseWeights, LoRASettings, TrainSettings  # noqa: E402
from backends.registry import (
    build_engine,  # noqa: E402
    select_backend,  # noqa: E402
)
from tests.backends.finetune_fixtures import tiny_model_dir  # noqa: E402

CONFIGS = {
    "llama": dict(architecture="llama"),
    "mistral-window": dict(architecture="mistral", sliding_window=4),
}


def _config(name: str) -> nf4core.ModelConfig:
    return nf4core.ModelConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **CONFIGS[name],
    )


def _packed(vocab: int, lengths=(5, 7, 4), max_length=20):
    rng = np.random.default_rng(0)
    examples = [
        nf4core.Example(rng.integers(0, vocab, n).astype(np.int32), np.arange(n) >= 1)
        for n in lengths
    ]
    (batch,) = nf4core.batches(
        nf4core.Dataset(examples), 1, 0, shuffle=False, packing=True, max_length=max_length
    )
    assert batch.segment_ids.max() == len(lengths) and (batch.segment_ids == 0).sum() > 0
    return examples, batch


def _per_token(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy of each position's next token, float64: logits (T, V), targets (T,)."""
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - z[np.arange(len(targets)), targets]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mlx_packed_row_equals_torch_and_separate_examples(name):
    from backends.mlx_backend._mlx import mx
    from backends.mlx_backend.model import CausalLM as MLXCausalLM
    from backends.mlx_backend.train_step import Batch as MLXBatch
    from backends.torch_backend.model import CausalLM
    from backends.torch_backend.train_step import Batch as TorchBatch
    from tests.backends.mlx_backend.tiny_models import random_tensors

    config = _config(name)
    tensors = random_tensors(config, seed=3)
    mlx_model = MLXCausalLM.from_state(config, tensors, quantize=False, compute_dtype="float32")
    torch_model = CausalLM.from_state(config, tensors, quantize=False).eval()
    examples, packed = _packed(config.vocab_size)

    mb = MLXBatch.from_tokens(
        packed.input_ids, packed.loss_mask, packed.position_ids, packed.segment_ids
    )
    mlx_logits = np.array(mlx_model(mb.inputs, None, *mb.packing()))[0]  # (T, V)
    tb = TorchBatch.from_numpy(packed)
    with torch.no_grad():
        torch_logits = torch_model(
            tb.input_ids, position_ids=tb.position_ids, segment_ids=tb.segment_ids
        )[0].numpy()
    np.testing.assert_allclose(mlx_logits, torch_logits[:-1], atol=1e-4, rtol=1e-4)

    targets = np.array(mb.targets)[0]
    packed_losses = _per_token(mlx_logits, targets)  # position t predicts t + 1
    counted = np.array(mb.mask)[0] > 0
    start, want = 0, []
    for e in examples:
        n = e.input_ids.size
        alone = np.array(mlx_model(mx.array(e.input_ids[None])))[0]
        np.testing.assert_allclose(mlx_logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
        losses = _per_token(alone[:-1], e.input_ids[1:])
        want.extend(losses[e.loss_mask[1:]])
        assert not counted[start + n - 1]  # the next example's first token is not a target
        start += n
    np.testing.assert_allclose(packed_losses[counted], want, atol=1e-5)
    assert counted.sum() == len(want) == sum(int(e.loss_mask[1:].sum()) for e in examples)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("packed"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_engines_agree_on_a_packed_batch(model_dir, checkpointing):
    source = nf4core.open_model(model_dir)
    examples, packed = _packed(source.config.vocab_size, lengths=(9, 6), max_length=18)
    separate = list(
        nf4core.batches(nf4core.Dataset(examples), 1, 0, shuffle=False)
    )  # one example per batch
    results = {}
    for backend in ("torch", "mlx"):
        engine = build_engine(
            select_backend(backend, "cpu", "float32"),
            source,
            LoRASettings(),
            TrainSettings(grad_checkpoint=checkpointing),
            1e-3,
            BaseWeights("float32"),
        )
        total, n = engine.eval_loss([packed])
        alone = [engine.eval_loss([b]) for b in separate]
        assert n == sum(k for _, k in alone)
        assert total == pytest.approx(sum(s for s, _ in alone), rel=1e-5)
        step = engine.train_step([packed], 1e-3)  # the compiled training path takes packed rows
        assert step.tokens == n and step.loss == pytest.approx(total / n, rel=1e-5)
        results[backend] = (total, n)
    assert results["mlx"][1] == results["torch"][1]
    assert results["mlx"][0] == pytest.approx(results["torch"][0], rel=1e-4)


def test_mlx_refuses_packed_rows_with_a_kv_cache():
    from backends.mlx_backend._mlx import mx
    from backends.mlx_backend.model import CausalLM
    from tests.backends.mlx_backend.tiny_models import random_tensors

    config = _config("llama")
    model = CausalLM.from_state(config, random_tensors(config), compute_dtype="float32")
    ids = mx.array([[1, 2, 3, 4]])
    segments, positions = mx.array([[1, 1, 2, 2]]), mx.array([[0, 1, 0, 1]])
    with pytest.raises(ValueError, match="packed rows .* cannot be combined with a KV cache"):
        model(ids, model.make_cache(), positions, segments)
