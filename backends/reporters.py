"""Metrics for outside viewers (`--report-to`): TensorBoard event files under OUT/tensorboard and a
Weights & Biases run under OUT/wandb. Both packages are optional and imported only when asked for.

Each metrics.jsonl record the run writes is forwarded; the numbers shown are named by TAGS.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from .finetune_config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name: pip package
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "eval_loss": "eval/loss",
    "perplexity": "eval/perplexity",
    "exact_match": "eval/exact_match",
}


def check_reporters(names: tuple[str, ...]) -> None:
    """Before anything is written: the package of every asked-for logger imports."""
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError as e:
            raise ConfigError(
                f"report_to {name}: the {name} package is not installed "
                f"(pip install {PACKAGES[name]}) ({e})"
            ) from e


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their viewer tags (the exact-match phase in its tag)."""
    out = {}
    for key, tag in TAGS.items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if key == "exact_match":
                tag = f"{tag}_{record.get('phase', 'after')}"
            out[tag] = float(value)
    return out


class TensorBoardReporter:
    """Scalar events in one new event file under `directory` (TensorBoard's own writer)."""

    def __init__(self, directory: Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        directory.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(directory))

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    """A wandb run in `directory`; offline (synced later with `wandb sync`) unless WANDB_MODE says
    otherwise, since nothing at run time goes to the network unless the user asks."""

    def __init__(self, directory: Path, config: dict) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "nf4-qlora"),
            dir=str(directory),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class Reporters:
    """The loggers a run asked for, fed every metrics record; closed when the run ends."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict) -> None:
        self._open = []
        for name in names:
            if name == "tensorboard":
                self._open.append(TensorBoardReporter(out / "tensorboard"))
            else:
                self._open.append(WandbReporter(out, config))

    def record(self, record: dict) -> None:
        values = scalars(record)
        if values and "step" in record:
            for reporter in self._open:
                reporter.log(int(record["step"]), values)

    def close(self) -> None:
        for reporter in self._open:
            reporter.close()
        self._open = []
