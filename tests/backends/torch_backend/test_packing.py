"""Packed rows (several examples end to end, nf4core.batches(packing=True)) behave exactly like the
examples run one by one: RoPE positions restart, attention stays within an example, and the first
token of an example is not predicted from the previous one."""

import numpy as np
import torch

import nf4core
from backends.torch_backend.model import CausalLM, causal_lm_loss
from backends.torch_backend.train_step import Batch
from tests.backends.torch_backend.test_train_step import CFG, tiny_state


def test_packed_row_equals_separate_examples():
    model = CausalLM.from_state(CFG, tiny_state()).eval()
    rng = np.random.default_rng(0)
    examples = [
        nf4core.Example(rng.integers(0, CFG.vocab_size, n).astype(np.int32), np.arange(n) >= 2)
        for n in (5, 7, 4)
    ]
    dataset = nf4core.Dataset(examples)
    (packed,) = list(
        nf4core.batches(dataset, batch_size=1, pad_id=0, shuffle=False, packing=True, max_length=20)
    )
    batch = Batch.from_numpy(packed)
    assert batch.segment_ids.max() == 3 and (batch.segment_ids == 0).sum() == 4  # 4 padding slots
    with torch.no_grad():
        logits = model(
            batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids
        )
        total, count = causal_lm_loss(logits, batch.input_ids, batch.loss_mask, batch.segment_ids)
        start, want_total, want_count = 0, 0.0, 0
        for e in examples:
            ids = torch.from_numpy(e.input_ids).long()[None]
            alone = model(ids)
            n = ids.shape[1]
            assert torch.allclose(logits[:, start : start + n], alone, atol=1e-5)
            s, c = causal_lm_loss(alone, ids, torch.from_numpy(e.loss_mask)[None])
            want_total, want_count, start = want_total + s, want_count + c, start + n
    assert count == want_count == batch.n_targets()
    assert torch.allclose(total, want_total, atol=1e-4)


def test_unpacked_rows_keep_the_causal_path():
    examples = [
        nf4core.Example(np.arange(1, n + 1, dtype=np.int32), np.ones(n, bool)) for n in (3, 6)
    ]
    (nb,) = list(nf4core.batches(nf4core.Dataset(examples), batch_size=2, pad_id=0, shuffle=False))
    batch = Batch.from_numpy(nb)
    assert batch.segment_ids is None and batch.input_ids.shape == (2, 6)
    assert batch.n_targets() == 2 + 5  # padding is masked out by the loss mask
