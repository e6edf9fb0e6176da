"""Tokenized training data: loss masks, truncation, seeded shuffling, padded or packed batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .data_files import read_records
from .data_formats import FORMATS
from .jsonl import DataFormatError, Record
from .tokenizer import Tokenizer, encode_with_offsets


@dataclass(frozen=True)
class DataConfig:
    """Where the data is (a file or directory, or a tuple of them, concatenated; see
    nf4core.data_files) and how to cut it. `valid_fraction` splits `train` when `valid` is None;
    `data_format` is "auto" or one of nf4core.data_formats.FORMATS."""

    train: str | os.PathLike | tuple
    valid: str | os.PathLike | tuple | None = None
    valid_fraction: float = 0.0
    max_length: int = 2048
    seed: int = 0
    skip_bad_lines: bool = False
    data_format: str = "auto"

    def __post_init__(self) -> None:
        if self.data_format not in ("auto", *FORMATS):
            raise ValueError(
                f"data_format must be auto or one of {', '.join(FORMATS)}, got {self.data_format!r}"
            )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.valid is not None and self.valid_fraction:
            raise ValueError("give either a valid file or a valid_fraction, not both")
        if (
            isinstance(self.max_length, bool)
            or not isinstance(self.max_length, int)
            or (self.max_length < 2)
        ):
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")


@dataclass(frozen=True)
class Example:
    """input_ids int32 (T,); loss_mask bool (T,): True where the token is a target of the loss
    (the model learns to predict it from the tokens before it)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    truncated: int = 0  # examples cut to max_length
    skipped: int = 0  # bad lines left out (skip_bad_lines)
    no_targets: tuple[str, ...] = ()  # "file:line" of records left out: no target token to learn
    formats: tuple[str, ...] = ()  # the record formats read (nf4core.data_formats), sorted

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class Batch:
    """input_ids int32 (B, T); loss_mask bool (B, T); attention_mask bool (B, T), False on padding;
    position_ids int32 (B, T) and segment_ids int32 (B, T) (1, 2, ... per packed example, 0 on
    padding) so attention can stay within an example."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray


def tokenize_record(record: Record, tokenizer: Tokenizer) -> Example:
    """One record as tokens: all tokens are targets for text; only the completion / assistant turns
    (their end-of-turn tokens included) where there is a prompt."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if record.kind == "text":
        ids = tokenizer.encode(record.fields["text"]) + eos
        mask = [True] * len(ids)
    elif record.kind == "completion":
        prompt = tokenizer.encode(record.fields["prompt"])
        completion = tokenizer.encode(record.fields["completion"], add_special_tokens=False) + eos
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    else:
        ids, mask = _chat_tokens(record, tokenizer)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _chat_tokens(record: Record, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    if not tokenizer.chat_template:
        raise DataFormatError(
            f"{record.where}: a 'messages' record needs a chat template, and the tokenizer has none"
        )
    messages = record.fields["messages"]
    tools = {"tools": record.fields["tools"]} if "tools" in record.fields else {}
    text = tokenizer.apply_chat_template(messages, **tools)
    _check_rendered(record, tokenizer, text)
    spans = []  # character ranges of the assistant turns, as the template renders them
    for k, message in enumerate(messages):
        trained = message.get("weight", 1) and k >= record.fields.get("first_target", 0)
        if message["role"] != "assistant" or not trained:
            continue
        start = (
            tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, **tools)
            if k
            else ""
        )
        end = tokenizer.apply_chat_template(messages[: k + 1], **tools)
        if not (text.startswith(start) and text.startswith(end) and len(start) < len(end)):
            raise DataFormatError(
                f"{record.where}: the chat template does not render this "
                "conversation as a sequence of turns; cannot mask the prompt"
            )
        spans.append((len(start), len(end)))
    # the template writes the special tokens it wants (a BOS included), as transformers assumes
    ids, offsets = encode_with_offsets(tokenizer, text, add_special_tokens=False)
    mask = [any(a <= s < b for a, b in spans) and e > s for s, e in offsets]
    return ids, mask


def _check_rendered(record: Record, tokenizer: Tokenizer, text: str) -> None:
    """DataFormatError when the template leaves out the tool calls or tool list the record has (the
    model would learn turns without them)."""
    messages = record.fields["messages"]
    if "tools" in record.fields and text == tokenizer.apply_chat_template(messages):
        raise DataFormatError(
            f"{record.where}: the chat template does not render 'tools' (the tool list)"
        )
    for k, message in enumerate(messages):
        if "tool_calls" not in message:
            continue
        bare = {key: v for key, v in message.items() if key != "tool_calls"}
        without = [*messages[:k], bare, *messages[k + 1 :]]
        tools = {"tools": record.fields["tools"]} if "tools" in record.fields else {}
        if text == tokenizer.apply_chat_template(without, **tools):
            raise DataFormatError(
                f"{record.where}: the chat template does not render tool calls "
                f"(messages[{k}].tool_calls)"
            )


def load_dataset(config: DataConfig, tokenizer: Tokenizer) -> tuple[Dataset, Dataset | None]:
    """The train and validation sets (validation None without a file or fraction), tokenized."""
    records, skipped = read_records(config.train, config.skip_bad_lines, config.data_format)
    valid_records, valid_skipped = (
        read_records(config.valid, config.skip_bad_lines, config.data_format)
        if config.valid is not None
        else (None, 0)
    )
    if config.valid_fraction:
        order = np.random.default_rng(config.seed).permutation(len(records))
        n_valid = max(1, round(len(records) * config.valid_fraction))
        if n_valid >= len(records):
            raise ValueError(
                f"{config.train}: {len(records)} records are too few to split off "
                f"{config.valid_fraction:.0%} for validation"
            )
        valid_records = [records[i] for i in sorted(order[-n_valid:])]
        records = [records[i] for i in sorted(order[:-n_valid])]
    train = _tokenized(records, tokenizer, config.max_length, skipped)
    valid = (
        None
        if valid_records is None
        else _tokenized(valid_records, tokenizer, config.max_length, valid_skipped)
    )
    return train, valid


def _tokenized(
    records: list[Record], tokenizer: Tokenizer, max_length: int, skipped: int
) -> Dataset:
    """Records with no target token (e.g. a prompt that fills `max_length`, or an empty text) are
    left out and named in `no_targets`: they would give a step nothing to learn from."""
    examples, truncated, no_targets = [], 0, []
    for record in records:
        example = tokenize_record(record, tokenizer)
        if example.input_ids.size > max_length:
            truncated += 1
            example = Example(example.input_ids[:max_length], example.loss_mask[:max_length])
        if example.loss_mask[1:].any():  # token 0 is never predicted
            examples.append(example)
        else:
            no_targets.append(record.where)
    formats = tuple(sorted({r.format for r in records if r.format}))
    return Dataset(examples, truncated, skipped, tuple(no_targets), formats)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(
    dataset: Dataset,
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    packing: bool = False,
    max_length: int | None = None,
) -> Iterator[Batch]:
    """Batches of one epoch. Padding: each batch padded to its longest example. Packing: examples
    are laid end to end in rows of `max_length` tokens (required), `batch_size` rows a batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset.examples)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    examples = [dataset.examples[i] for i in order]
    if not packing:
        for start in range(0, n, batch_size):
            rows = [[e] for e in examples[start : start + batch_size]]
            yield _assemble(rows, max(e.input_ids.size for [e] in rows), pad_id)
        return
    if max_length is None:
        raise ValueError("packing needs max_length (the length of a packed row)")
    rows: list[list[Example]] = []
    used = max_length
    for e in examples:
        if e.input_ids.size > max_length:
            raise ValueError(
                f"an example of {e.input_ids.size} tokens does not fit a packed row of "
                f"{max_length}; load the data with max_length <= {max_length}"
            )
        if used + e.input_ids.size > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += e.input_ids.size
    for start in range(0, len(rows), batch_size):
        yield _assemble(rows[start : start + batch_size], max_length, pad_id)


def _assemble(rows: list[list[Example]], length: int, pad_id: int) -> Batch:
    shape = (len(rows), length)
    ids = np.full(shape, pad_id, np.int32)
    loss = np.zeros(shape, bool)
    positions = np.zeros(shape, np.int32)
    segments = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        col = 0
        for s, e in enumerate(row, start=1):
            t = e.input_ids.size
            ids[r, col : col + t] = e.input_ids
            loss[r, col : col + t] = e.loss_mask
            positions[r, col : col + t] = np.arange(t)
            segments[r, col : col + t] = s
            col += t
    return Batch(ids, loss, segments > 0, positions, segments)
