"""The built-in task of the default fine-tune: generated here, deterministically, so the default run
needs no data files and no network.

Task (provisional; tuned with the real model in issue 6): "shift every digit up by one, 9 wraps to 0",
e.g. "4 9 0 7" -> "5 0 1 8". The base model does not know the rule; a short LoRA run teaches it. The
held-out digit strings never occur in the training set, so the exact-match score measures the skill,
not memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{question}"},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


def default_task(seed: int = 0, n_train: int = 2000, n_heldout: int = 100, min_len: int = 3,
                 max_len: int = 6) -> DefaultTask:
    """The task's train and held-out sets, the same for the same arguments on every machine."""
    if n_train <= 0 or n_heldout <= 0:
        raise ValueError(f"need at least one training and one held-out example, got {n_train}, {n_heldout}")
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
    recommended = {"steps": 150, "lr": 1e-3, "lora_r": 8, "lora_alpha": 16, "batch_size": 8,
                   "max_seq_len": 96, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
    return DefaultTask(TASK_NAME, records[:n_train], records[n_train:], recommended)


def exact_match(prediction: str, reference: str) -> bool:
    """True when the prediction is the reference, ignoring surrounding white space."""
    return prediction.strip() == reference.strip()
