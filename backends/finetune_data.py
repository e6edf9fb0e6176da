"""The data side of a `finetune` run: the training set as deterministic micro-batches (packed or
not), the data files read and checked before anything is written, and the step count they imply."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import nf4core
from nf4core.data_files import DataFiles, find_data
from nf4core.dataset import epoch_order
from nf4core.default_task import DefaultTask

from .finetune_config import ConfigError, FinetuneConfig


class TrainBatches:
    """The micro-batch with global index g (epoch g // per_epoch), for any g, deterministically.

    With `packing`, examples are laid end to end in rows of `max_length` tokens once (in the seed's
    order) and the rows are shuffled each epoch, so every epoch has the same number of batches."""

    def __init__(
        self,
        dataset: nf4core.Dataset,
        batch_size: int,
        pad_id: int,
        seed: int,
        packing: bool = False,
        max_length: int | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ConfigError("the training set is empty")
        self.dataset, self.batch_size, self.pad_id, self.seed = dataset, batch_size, pad_id, seed
        self.rows = None
        if packing:
            self.rows = list(
                nf4core.batches(
                    dataset, 1, pad_id, seed=seed, epoch=0, packing=True, max_length=max_length
                )
            )
        self.per_epoch = math.ceil(len(self.rows or dataset) / batch_size)
        self._epoch, self._batches = None, None

    def batch_rows(self) -> set[int]:
        """The row counts of the micro-batches (the last of an epoch may hold fewer)."""
        n = len(self.rows or self.dataset)
        return {min(n, self.batch_size)} | (
            {n % self.batch_size} if n > self.batch_size and n % self.batch_size else set()
        )

    def __getitem__(self, g: int) -> nf4core.Batch:
        epoch, index = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = list(self._epoch_batches(epoch))
        return self._batches[index]

    def _epoch_batches(self, epoch: int) -> Iterator[nf4core.Batch]:
        if self.rows is None:
            yield from nf4core.batches(
                self.dataset, self.batch_size, self.pad_id, seed=self.seed, epoch=epoch
            )
            return
        order = epoch_order(len(self.rows), self.seed, epoch)
        for start in range(0, len(order), self.batch_size):
            yield _stacked([self.rows[i] for i in order[start : start + self.batch_size]])


def _stacked(rows: list[nf4core.Batch]) -> nf4core.Batch:
    """Packed rows of one batch in one, cut after the last column any row uses."""
    segments = np.concatenate([r.segment_ids for r in rows])
    width = int(np.flatnonzero(segments.any(axis=0))[-1]) + 1

    def field(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in rows])[:, :width]

    return nf4core.Batch(
        *(
            field(n)
            for n in ("input_ids", "loss_mask", "attention_mask", "position_ids", "segment_ids")
        )
    )


def task_files(task: DefaultTask) -> dict[str, str]:
    """The built-in task's data as JSONL texts (written to OUT/data for reference)."""
    return {
        name: "".join(json.dumps(r) + "\n" for r in records)
        for name, records in (("train.jsonl", task.train), ("valid.jsonl", task.heldout))
    }


def load_data(
    cfg: FinetuneConfig,
    task: DefaultTask | None,
    tokenizer: nf4core.Tokenizer,
    scratch: Path,
    echo: Callable[[str], None] = print,
) -> tuple[nf4core.Dataset, nf4core.Dataset | None, list[dict]]:
    """(train set, validation set or None, held-out records for exact match (built-in task only)).
    The built-in task's files are written under `scratch`."""
    if task is not None and cfg.data_format != "auto":
        raise ConfigError(
            f"data_format {cfg.data_format}: applies to --data, not the built-in task"
        )
    if task is not None:
        for name, text in task_files(task).items():
            (scratch / name).write_text(text, encoding="utf-8")
        train, valid = scratch / "train.jsonl", scratch / "valid.jsonl"
        held = task.heldout
    else:
        files = find_data(cfg.data)
        train, valid = files.train, files.valid or None
        held = []
    dc = nf4core.DataConfig(
        train=train,
        valid=valid,
        max_length=cfg.max_seq_len,
        seed=cfg.seed,
        data_format=cfg.data_format,
    )
    ds_train, ds_valid = nf4core.load_dataset(dc, tokenizer)
    if task is None:
        echo(_describe_data(files, ds_train, ds_valid))
    prefix = str(scratch) + os.sep

    def shown(where: str) -> str:  # the built-in task's scratch files by their name
        return where.replace(prefix, "the built-in task's ") if task is not None else where

    for ds in (ds_train, ds_valid):
        if ds is not None and ds.no_targets:
            _report_no_targets([shown(w) for w in ds.no_targets], cfg, echo)
    if not ds_train.examples:
        where = shown(str(train)) if task is not None else cfg.data
        raise ConfigError(f"{where}: no record has a target token to learn from")
    if cfg.eval_max_examples:
        held = held[: cfg.eval_max_examples]
    return ds_train, ds_valid, held


def _describe_data(files: DataFiles, train: nf4core.Dataset, valid: nf4core.Dataset | None) -> str:
    """One line: the files read and the record formats found in them."""

    def shown(paths: tuple[Path, ...]) -> str:
        return str(paths[0]) + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")

    formats = sorted(set(train.formats) | set(valid.formats if valid else ()))
    line = f"data: {shown(files.train)}, {len(train)} examples"
    if valid is not None:
        line += f"; validation: {shown(files.valid)}, {len(valid)} examples"
    return line + f" (format: {'+'.join(formats)})"


def _report_no_targets(where: list[str], cfg: FinetuneConfig, echo: Callable[[str], None]) -> None:
    why = (
        f"no target tokens (a prompt of --max-seq-len {cfg.max_seq_len} tokens or more, or no text)"
    )
    n = len(where)
    if cfg.strict_data:
        raise ConfigError(f"{where[0]}: {why}; {n} such record(s) (--strict-data refuses them)")
    shown = ", ".join(where[:5]) + (", ..." if n > 5 else "")
    echo(f"skipped {n} record(s) with {why}: {shown}")


def total_steps(cfg: FinetuneConfig, data: TrainBatches) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * data.per_epoch / cfg.grad_accum))
