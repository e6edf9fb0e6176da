"""How a global batch is shared out over the ranks of a launcher, before any process group exists."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core
from backends.finetune_data import TrainBatches
from backends.world import World, WorldError, check_split, launched_rank, take_rows


def batch(rows: int, length: int = 5) -> nf4core.Batch:
    ids = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
    ones = np.ones_like(ids, bool)
    return nf4core.Batch(ids, ones, ones.copy(), ids.copy(), ones.astype(np.int32))


def test_the_ranks_rows_cover_the_batch_once_in_order():
    b = batch(6)
    parts = [take_rows(b, World(r, 3).rows(6)) for r in range(3)]
    for field in ("input_ids", "loss_mask", "attention_mask", "position_ids", "segment_ids"):
        whole = np.concatenate([getattr(p, field) for p in parts])
        np.testing.assert_array_equal(whole, getattr(b, field))
    assert all(isinstance(p, nf4core.Batch) and len(p.input_ids) == 2 for p in parts)


def test_a_batch_that_does_not_split_is_refused_by_name():
    check_split(World(1, 2), {4, 2}, "--batch-size 4")
    with pytest.raises(
        WorldError, match=r"--batch-size 4: a batch of 3 rows does not split over 2"
    ):
        check_split(World(0, 2), {4, 3}, "--batch-size 4")


def test_the_rank_a_launcher_gave_is_known_before_joining():
    assert launched_rank({}) == 0
    assert launched_rank({"RANK": "1"}) == 0  # no launcher's marks: a plain process
    assert launched_rank({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1"}) == 1
    assert launched_rank({"MLX_RANK": "3"}) == 3


def test_the_row_counts_of_an_epoch_include_its_short_last_batch():
    examples = [nf4core.Example(np.arange(4, dtype=np.int32), np.ones(4, bool)) for _ in range(10)]
    data = nf4core.Dataset(examples)
    assert TrainBatches(data, 4, 0, 0).batch_rows() == {4, 2}
    assert TrainBatches(data, 5, 0, 0).batch_rows() == {5}
    assert TrainBatches(data, 16, 0, 0).batch_rows() == {10}
