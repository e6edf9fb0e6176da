"""The JSON files of a training checkpoint, checked field by field: a malformed file is one clear
error naming the file and the field, never an assertion or a traceback later in the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from nf4core.regular_file import check_regular_file

from .finetune_config import ConfigError, FinetuneConfig

FORMAT_VERSION = 1
BACKENDS = ("torch", "mlx")
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of an unknown version; the message names the path."""


def read_json_file(path: Path) -> object:
    check_regular_file(path, CheckpointError)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_latest(path: Path) -> str:
    """The checkpoint name latest.json points to: a plain directory name beside it."""
    value = read_json_file(path)
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object like "
            f'{{"checkpoint": "step-000050"}}, got {type(value).__name__}'
        )
    name = value.get("checkpoint")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: field 'checkpoint' must be a directory name, got {name!r}")
    if Path(name).name != name or name in (".", "..") or name.startswith("."):
        raise CheckpointError(
            f"{path}: field 'checkpoint' must name a checkpoint beside it, got {name!r}"
        )
    return name


def read_state(path: Path) -> dict:
    """trainer_state.json, every field checked (its config as a FinetuneConfig would take it)."""
    info = read_json_file(path)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(info).__name__}")
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown checkpoint format version "
            f"{info.get('format_version')!r} "
            f"(this version reads {FORMAT_VERSION})"
        )
    for name in ("step", "backend", "data_position", "config"):
        if name not in info:
            raise CheckpointError(f"{path}: missing or bad field {name!r} (not present)")
    step = info["step"]
    if not _count(step):
        raise CheckpointError(f"{path}: step must be an integer >= 0, got {step!r}")
    if info["backend"] not in BACKENDS:
        raise CheckpointError(f"{path}: backend must be one of {BACKENDS}, got {info['backend']!r}")
    position = info["data_position"]
    if not isinstance(position, dict) or not _count(position.get("micro_batches")):
        raise CheckpointError(
            f"{path}: data_position must be an object with an integer "
            f"micro_batches >= 0, got {position!r}"
        )
    config = info["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config must be an object, got {type(config).__name__}")
    try:
        run = FinetuneConfig.from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: config: {e}") from e
    if run.steps is not None and step > run.steps:
        raise CheckpointError(f"{path}: step {step} is beyond the run's {run.steps} steps")
    named = _STEP_DIR.fullmatch(path.parent.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(
            f"{path}: step {step} does not match the checkpoint directory {path.parent.name}"
        )
    return info


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
