"""One process of the MLX data-parallel test: train the MLX engine a few steps on fixed global batches.

python -m tests.backends.mlx_backend.dist_worker MODEL_DIR OUT_DIR [--rows N] [--steps K] [--die S]

Run plainly (one process) or under `mlx.launch` (each rank trains on its rows of every global
micro-batch). Each rank writes OUT_DIR/rank<r>.json (world, losses, grad norms, token counts) and
OUT_DIR/rank<r>.safetensors (the final adapters); an error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import nf4core
from backends.engine import BaseWeights, LoRASettings, TrainSettings
from backends.registry import build_engine, select_backend
from backends.world import WorldError

GRAD_ACCUM = 2
SEQ = 12


def global_batches(rows: int) -> list[nf4core.Batch]:
    """GRAD_ACCUM micro-batches of `rows` rows whose rows learn from different numbers of tokens (so
    the ranks' shares of the target count differ), one of them with padding."""
    rng = np.random.default_rng(7)
    out = []
    for m in range(GRAD_ACCUM):
        ids = rng.integers(0, 300, (rows, SEQ)).astype(np.int32)
        learn = np.zeros((rows, SEQ), bool)
        for r in range(rows):
            learn[r, (r + m) % 5 + 1 :] = True  # a prompt of 1..5 tokens, then the completion
        attention = np.ones_like(learn)
        attention[0, -3:] = learn[0, -3:] = False  # padding
        segments = attention.astype(np.int32)
        positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()
        out.append(nf4core.Batch(ids, learn, attention, positions, segments))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--die", type=int, help="rank 1 exits at once before this step")
    args = parser.parse_args()
    engine = build_engine(
        select_backend("mlx", "cpu", "float32"),
        nf4core.open_model(args.model),
        LoRASettings(r=4, alpha=8.0),
        TrainSettings(grad_accum=GRAD_ACCUM, max_grad_norm=0.5, weight_decay=0.01),
        1e-2,
        BaseWeights("nf4"),
    )
    batches, steps = global_batches(args.rows), []
    try:
        for step in range(args.steps):
            if step == args.die and engine.world.rank == 1:
                os._exit(3)  # a rank that dies mid-run, leaving its peer in the next all-sum
            steps.append(engine.train_step(batches, 2e-2))
    except WorldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    w = engine.world
    eval_loss = engine.eval_loss(batches)
    report = {
        "world": [w.rank, w.size, w.launcher],
        "losses": [s.loss for s in steps],
        "grad_norms": [s.grad_norm for s in steps],
        "tokens": [s.tokens for s in steps],
        "eval_loss": list(eval_loss),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(engine.training_state().adapters, str(args.out / f"rank{w.rank}.safetensors"))
    (args.out / f"rank{w.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
