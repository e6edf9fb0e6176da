"""`--paged-optimizer` / `--no-paged-optimizer` reach the MLX engine: paged keeps the optimizer pages
in host memory (numpy arrays, copied in per update), unpaged keeps them as mlx arrays; both give the
same numbers (the arithmetic is the same)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import nf4core  # noqa: E402
from backends.engine import BaseWeights, LoRASettings, TrainSettings
from backends.registry import (
    build_engine,  # noqa: E402
    select_backend,  # noqa: E402
)
from tests.backends.finetune_fixtures import tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return nf4core.open_model(tiny_model_dir(tmp_path_factory.mktemp("paged")))


def _trained(source, paged):
    engine = build_engine(
        select_backend("mlx", "cpu", "float32"),
        source,
        LoRASettings(r=4),
        TrainSettings(paged=paged),
        1e-2,
        BaseWeights("nf4"),
    )
    ids = np.random.default_rng(0).integers(0, 300, (2, 10)).astype(np.int32)
    batch = nf4core.Batch(
        ids, np.ones_like(ids, bool), np.ones_like(ids, bool), np.zeros_like(ids), np.ones_like(ids)
    )
    for _ in range(2):
        engine.train_step([batch], 1e-2)
    return engine


@pytest.mark.parametrize(
    "paged,placement,page_type",
    [(True, "host", np.ndarray), (None, "host", np.ndarray), (False, "device", mx.array)],
)
def test_the_option_chooses_where_the_pages_live(source, paged, placement, page_type):
    optimizer = _trained(source, paged).trainer.optimizer
    assert optimizer.config.placement == placement
    pages = optimizer._pages
    assert pages and all(isinstance(a, page_type) for p in pages for a in p.resident)


def test_paged_and_unpaged_give_the_same_adapters(source):
    paged, unpaged = _trained(source, True).adapters(), _trained(source, False).adapters()
    assert paged.keys() == unpaged.keys()
    for key in paged:
        np.testing.assert_array_equal(paged[key], unpaged[key])
    assert any(np.abs(v).max() > 0 for k, v in paged.items() if "lora_B" in k)
