"""Evaluation that needs only an Engine: perplexity on a dataset, exact match by greedy generation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nf4core
from nf4core.default_task import exact_match

from .engine import Engine


@dataclass(frozen=True)
class ExactMatch:
    correct: int
    total: int
    samples: list[tuple[str, str]]  # (prediction, reference), the first few

    @property
    def score(self) -> float:
        return self.correct / max(1, self.total)


def stop_ids(tokenizer: nf4core.Tokenizer) -> tuple[int, ...]:
    ids = {
        tokenizer.eos_token_id,
        tokenizer.token_id("<|im_end|>")
        if tokenizer.backend.token_to_id("<|im_end|>") is not None
        else None,
    }
    return tuple(sorted(i for i in ids if i is not None))


def prompt_and_answer(record: dict, tokenizer: nf4core.Tokenizer) -> tuple[list[int], str]:
    """Token ids of the prompt (chat template with the generation prompt for chat records) and the
    reference answer, for a chat record or a prompt/completion record."""
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a chat record for exact match must end with an assistant turn")
        text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False), messages[-1]["content"]
    if "prompt" in record and "completion" in record:
        return tokenizer.encode(record["prompt"]), record["completion"]
    raise ValueError("exact match needs records with 'messages' or 'prompt' and 'completion'")


def exact_match_score(
    engine: Engine,
    tokenizer: nf4core.Tokenizer,
    records: Sequence[dict],
    keep_samples: int = 3,
    max_batch: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> ExactMatch:
    """Greedy answers to each record's prompt compared with its reference (white space trimmed).

    Prompts of one token length are decoded together (`Engine.greedy_batch`), up to `max_batch` rows;
    each answer may run to its reference's length plus 4 tokens. `progress(done, total)` is called
    after each decoded group."""
    eos = stop_ids(tokenizer)
    prepared = [prompt_and_answer(r, tokenizer) for r in records]
    budgets = [len(tokenizer.encode(ref, add_special_tokens=False)) + 4 for _, ref in prepared]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (prompt, _) in enumerate(prepared):
        by_length[len(prompt)].append(i)
    answers: dict[int, list[int]] = {}
    with engine.inference():
        for members in by_length.values():
            for s in range(0, len(members), max_batch):
                rows = members[s : s + max_batch]
                out = engine.greedy_batch(
                    [prepared[i][0] for i in rows], max(budgets[i] for i in rows), eos
                )
                answers.update((i, ids[: budgets[i]]) for i, ids in zip(rows, out))
                if progress is not None:
                    progress(len(answers), len(records))
    correct, samples = 0, []
    for i, (_, reference) in enumerate(prepared):
        prediction = tokenizer.decode(answers[i], skip_special_tokens=True)
        correct += exact_match(prediction, reference)
        if len(samples) < keep_samples:
            samples.append((prediction, reference))
    return ExactMatch(correct, len(records), samples)


def perplexity(
    engine: Engine,
    dataset: nf4core.Dataset,
    batch_size: int,
    pad_id: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float]:
    """(mean loss per target token, its exp) over the dataset, in order; `progress(examples done,
    examples)` after each batch."""
    batches = list(nf4core.batches(dataset, batch_size, pad_id, shuffle=False))
    total, n, done = 0.0, 0, 0
    with engine.inference():
        for b in batches:
            s, k = engine.eval_loss([b])
            total, n, done = total + s, n + k, done + b.input_ids.shape[0]
            if progress is not None:
                progress(done, len(dataset))
    loss = total / max(1, n)
    return loss, math.exp(min(loss, 700.0))
