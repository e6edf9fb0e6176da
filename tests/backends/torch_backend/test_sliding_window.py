"""Mistral's sliding window in the torch model: transformers' logits, cached decoding past the
window, and packed examples, each also run with the window dropped to show that it matters."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import nf4core
from backends.torch_backend.model import CausalLM
from backends.torch_backend.model.masks import attention_mask
from backends.torch_backend.train_step import Batch
from tests.backends.torch_backend.test_model import load_dequantized_into
from tests.backends.torch_backend.tiny_models import hf_model, state_of

WINDOW = 4


@pytest.fixture(scope="module")
def pair():
    hf, cfg = hf_model("mistral", seed=2, sliding_window=WINDOW)
    ours = CausalLM.from_state(cfg, state_of(hf), quantize=True, blocksize=64)
    load_dequantized_into(hf, ours)
    return hf, ours


def without_window(model: CausalLM) -> CausalLM:
    """The same modules, attending over every earlier position."""
    full = CausalLM(
        dataclasses.replace(model.config, sliding_window=None),
        model.model,
        model.lm_head,
        model.compute_dtype,
    )
    return full.eval()


def tokens(n: int, rows: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (rows, n), generator=torch.Generator().manual_seed(seed))


def test_mask_follows_transformers_window_rule():
    mask = attention_mask(3, 5, WINDOW, "cpu")  # queries at 5, 6, 7 over keys 0..7
    for row, i in enumerate(range(5, 8)):
        assert mask[row].nonzero().flatten().tolist() == list(range(i - WINDOW + 1, i + 1))
    assert attention_mask(4, 0, WINDOW, "cpu") is None  # all keys inside the window: is_causal
    assert attention_mask(1, 3, WINDOW, "cpu") is None  # one query over 4 keys


def test_logits_match_transformers_and_the_window_matters(pair):
    hf, ours = pair
    ids = tokens(14)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
        full = without_window(ours)(ids)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    assert torch.allclose(full[:, :WINDOW], got[:, :WINDOW], atol=1e-5)  # no key is cut yet
    assert (full[:, WINDOW:] - got[:, WINDOW:]).abs().amax(-1).min() > 1e-2  # every later position


def test_cached_decoding_past_the_window_equals_the_full_forward(pair):
    _, ours = pair
    ids = tokens(13, seed=1)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 13)
        parts = [ours(ids[:, :3], cache), ours(ids[:, 3:7], cache)]  # a prefill, a chunk past it
        parts += [ours(ids[:, t : t + 1], cache) for t in range(7, 13)]  # single tokens
        unwindowed = without_window(ours)(ids)
    stepped = torch.cat(parts, dim=1)
    assert torch.allclose(stepped, full, atol=1e-5, rtol=1e-5), (stepped - full).abs().max()
    assert not torch.allclose(stepped[:, -1], unwindowed[:, -1], atol=1e-2)


def test_packed_examples_with_the_window_equal_each_example_alone(pair):
    _, ours = pair
    rng = np.random.default_rng(3)
    examples = [
        nf4core.Example(rng.integers(0, 96, n).astype(np.int32), np.ones(n, bool))
        for n in (9, 3, 7)
    ]
    (packed,) = list(
        nf4core.batches(
            nf4core.Dataset(examples),
            batch_size=1,
            pad_id=0,
            shuffle=False,
            packing=True,
            max_length=22,
        )
    )
    batch = Batch.from_numpy(packed)
    assert batch.segment_ids.max() == 3
    with torch.no_grad():
        logits = ours(
            batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids
        )
        start = 0
        for e in examples:
            ids = torch.from_numpy(e.input_ids).long()[None]
            n = ids.shape[1]
            assert torch.allclose(logits[:, start : start + n], ours(ids), atol=1e-5), start
            start += n
        unwindowed = without_window(ours)(torch.from_numpy(examples[0].input_ids).long()[None])
    assert not torch.allclose(logits[:, WINDOW:9], unwindowed[:, WINDOW:], atol=1e-2)
