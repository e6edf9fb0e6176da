"""Initial LoRA adapter weights, generated here so every backend starts from identical numbers."""

from __future__ import annotations

import hashlib

import numpy as np


def lora_init(
    name: str, in_features: int, out_features: int, rank: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in PEFT's convention: A float32 (rank, in_features), B float32 zeros (out_features, rank).

    A is Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in_features), 1/sqrt(in_features)), as
    PEFT's default init. Its random stream depends on `seed` and on the module `name` only, so adapters
    do not change when other modules are added or the order of creation changes.
    """
    if rank <= 0 or in_features <= 0 or out_features <= 0:
        raise ValueError(
            f"LoRA rank and features must be positive, got r={rank}, "
            f"in={in_features}, out={out_features}"
        )
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))
    bound = 1.0 / np.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
    return a, np.zeros((out_features, rank), dtype=np.float32)
