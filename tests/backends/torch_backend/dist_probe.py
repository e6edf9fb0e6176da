"""Run by test_distributed.py under torchrun (and in-process for the one-process reference): builds
a TorchEngine on a tiny model, trains two steps with gradient checkpointing, evaluates and decodes,
and records the NF4 bytes this rank holds between layers. `python dist_probe.py MODEL_DIR OUT_DIR`
writes OUT_DIR/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import nf4core
from backends.engine import LoRASettings, TrainSettings
from backends.registry import build_engine, select_backend


def global_batch(rows: int = 4, length: int = 12, seed: int = 0) -> nf4core.Batch:
    ids = np.random.default_rng(seed).integers(3, 200, (rows, length)).astype(np.int32)
    ids[1, 9:] = 0  # a padded row
    mask = np.ones_like(ids, bool)
    mask[1, 9:] = False
    segments = mask.astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return nf4core.Batch(ids, mask, mask.copy(), positions, segments)


def probe(model_dir: str) -> dict:
    from backends.torch_backend.model.llama import DecoderLayer
    from backends.torch_backend.sharding import nf4_bytes, resident_nf4_bytes

    choice = select_backend("torch", "cpu", "float32")
    train = TrainSettings(grad_checkpoint=True, seed=0)
    engine = build_engine(choice, nf4core.open_model(model_dir), LoRASettings(r=4), train, 1e-3)
    between = []  # NF4 bytes held as each decoder layer starts (no linear running)
    for m in engine.model.modules():
        if isinstance(m, DecoderLayer):
            m.register_forward_pre_hook(lambda *_: between.append(resident_nf4_bytes(engine.model)))
    steps = [engine.train_step([global_batch(seed=s)], 1e-3) for s in range(2)]
    loss, targets = engine.batch_loss(global_batch(seed=5))
    odd_loss, _ = engine.batch_loss(global_batch(rows=3, seed=6))  # rows that do not split
    with engine.inference():
        tokens = engine.greedy_batch([[5, 6, 7], [8, 9, 10]], 4)
    return {
        "rank": engine.world.rank,
        "size": engine.world.size,
        "steps": [[s.loss, s.tokens, s.grad_norm] for s in steps],
        "eval": [loss, targets, odd_loss],
        "tokens": tokens,
        "full_nf4_bytes": nf4_bytes(engine.model),
        "max_between_layers": max(between),
        "adapters": {k: v.tolist() for k, v in engine.adapters().items()},
    }


if __name__ == "__main__":
    result = probe(sys.argv[1])
    Path(sys.argv[2], f"rank{result['rank']}.json").write_text(json.dumps(result))
