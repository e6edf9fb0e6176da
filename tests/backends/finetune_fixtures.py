"""A tiny Llama HF directory (with a ChatML tokenizer) and a small chat dataset for pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.nf4core.tiny_models import hf_config, random_weights, tiny_tokenizer, write_hf_dir


def tiny_model_dir(directory: Path, seed: int = 0) -> Path:
    config = hf_config("llama", tie=False, vocab=300)
    weights = random_weights(config, seed=seed)
    for name, w in weights.items():  # keep activations moderate: N(0, 1/in) weights, unit norms
        weights[name] = (
            np.ones_like(w) if w.ndim == 1 else (w / np.sqrt(w.shape[-1])).astype(np.float32)
        )
    return write_hf_dir(directory, config, weights, tiny_tokenizer(300))


def chat_records(n: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["fox", "dog", "hello", "world", "add", "quick", "lazy", "brown"]
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(words, 3))
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"repeat {q}"},
                    {"role": "assistant", "content": q},
                ]
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_setup(tmp: Path) -> tuple[Path, Path]:
    """(model dir, data file)."""
    return tiny_model_dir(tmp / "model"), write_jsonl(tmp / "train.jsonl", chat_records())
