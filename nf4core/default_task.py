"""The built-in task of the default fine-tune: generated here, deterministically, so the default run
needs no data files and no network.

Task: "shift every digit up by one, 9 wraps to 0", e.g. "4 9 0 7" -> "5 0 1 8" (3 to 6 digits,
space-separated, so each digit is one token of the SmolLM2/Llama tokenizers). The prompt states the
rule in words; the answer is the shifted digits only, scored by exact match (surrounding white space
ignored) of the greedy completion.

Why it is a fair demonstration: the base SmolLM2-135M-Instruct scores 0% (it chats about the
instruction instead of applying it), while 20 LoRA steps (batch 8, a few minutes on a 2-core CPU)
take it above 90% (BENCHMARKS.md, "Default run: built-in task"). It is honest: the held-out digit
strings never occur in the training set (checked in the generator and in the tests), so the score
measures the rule the adapter learned, not memorised pairs; and with ~1.1 million possible strings
against a few hundred training examples seen in a default run, memorising could not score anyway.
The rule needs both position-aligned copying and a per-digit map with a wrap-around, so a constant
or copy-the-input answer scores 0 (the tests check that too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .model_config import LINEAR_NAMES

TASK_NAME = "digit-shift"
INSTRUCTION = "Shift every digit up by one (9 becomes 0). Reply with the digits only."


@dataclass(frozen=True)
class DefaultTask:
    """train / heldout: records in the chat shape ({"messages": [user, assistant]}) that
    nf4core.dataset reads; `recommended` holds the fine-tuning settings the default run uses."""

    name: str
    train: list[dict]
    heldout: list[dict]
    recommended: dict = field(default_factory=dict)

    def prompts_and_answers(self, records: list[dict]) -> list[tuple[list[dict], str]]:
        """(the conversation without its answer, the expected answer) for each record."""
        return [(r["messages"][:-1], r["messages"][-1]["content"]) for r in records]


def _example(digits: np.ndarray) -> dict:
    question = " ".join(str(d) for d in digits)
    answer = " ".join(str((d + 1) % 10) for d in digits)
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n{question}"},
            {"role": "assistant", "content": answer},
        ]
    }


def default_task(
    seed: int = 0, n_train: int = 2000, n_heldout: int = 100, min_len: int = 3, max_len: int = 6
) -> DefaultTask:
    """The task's train and held-out sets, the same for the same arguments on every machine."""
    if n_train <= 0 or n_heldout <= 0:
        raise ValueError(
            f"need at least one training and one held-out example, got {n_train}, {n_heldout}"
        )
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if n_train + n_heldout > sum(10**k for k in range(min_len, max_len + 1)):
        raise ValueError(
            f"{n_train + n_heldout} distinct examples do not exist with {min_len} to "
            f"{max_len} digits"
        )
    rng = np.random.Generator(np.random.PCG64([seed, 20261129]))
    seen: set[tuple[int, ...]] = set()
    records: list[dict] = []
    while len(records) < n_train + n_heldout:
        digits = rng.integers(0, 10, size=int(rng.integers(min_len, max_len + 1)))
        key = tuple(int(d) for d in digits)
        if key in seen:
            continue
        seen.add(key)
        records.append(_example(digits))
    recommended = {
        "steps": 20,
        "lr": 1e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "batch_size": 8,
        "max_seq_len": 96,
        "targets": list(LINEAR_NAMES),
        "lora_dropout": 0.0,
        "warmup_steps": 3,
        "schedule": "cosine",
        "max_new_tokens": 2 * max_len + 4,
        "n_eval": n_heldout,
    }
    return DefaultTask(TASK_NAME, records[:n_train], records[n_train:], recommended)


def exact_match(prediction: str, reference: str) -> bool:
    """True when the prediction is the reference, ignoring surrounding white space."""
    return prediction.strip() == reference.strip()
