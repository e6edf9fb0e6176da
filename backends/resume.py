"""What a resumed run takes from its checkpoint, what the command line may change, where it writes.

A resume continues the checkpoint's run: settings that define the model, the data, the adapters or
the optimization (FIXED) must match it, and a command line that contradicts them is refused with the
differences listed. Settings of how long and how the run proceeds (CHANGEABLE) may change and are
reported. Where the run writes never comes from the checkpoint: `--out`, else the run directory the
checkpoint lies in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .checkpoint import Checkpoint
from .finetune_config import LEGACY_BASE, ConfigError, FinetuneConfig

FIXED = (
    "model",
    "data",
    "data_format",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "lr",
    "warmup_steps",
    "schedule",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "targets",
    "use_dora",
    "seed",
    "max_grad_norm",
    "weight_decay",
    "base_dtype",
    "quant_method",
    "packing",  # a step is a batch of packed rows, not of examples: the data position would move
)
CHANGEABLE = (
    "steps",
    "epochs",
    "backend",
    "device",
    "compute_dtype",
    "grad_checkpoint",
    "paged_optimizer",
    "eval_every",
    "save_every",
    "eval_max_examples",
    "export",
    "skip_nonfinite",
    "strict_data",
    "early_stopping_patience",
    "report_to",
)
FROM_COMMAND_LINE_ONLY = ("out", "resume", "overwrite")


def run_dir_of(ckpt: Checkpoint) -> Path | None:
    """The run directory holding the checkpoint (`<run>/checkpoints/step-N`), if it lies in one."""
    parent = ckpt.path.parent
    return parent.parent if parent.name == "checkpoints" else None


def same_dir(a: str | Path, b: str | Path | None) -> bool:
    if b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: object, name: str = "") -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "none"
    if value is None:
        return {"model": "the embedded model", "data": "the built-in task"}.get(name, "unset")
    return str(value)


def _same(name: str, given: object, saved: object) -> bool:
    if name in ("model", "data") and saved is not None:
        return same_dir(str(given), str(saved))
    return given == saved


def resumed_config(
    cfg: FinetuneConfig, ckpt: Checkpoint, echo: Callable[[str], None]
) -> FinetuneConfig:
    """The checkpoint's config with the command line's changeable settings applied (and reported),
    writing to `--out` or the checkpoint's run directory. ConfigError lists contradicting flags."""
    saved = FinetuneConfig.from_dict({**LEGACY_BASE, **ckpt.config})
    given = {k: getattr(cfg, k) for k in FIXED + CHANGEABLE if getattr(cfg, k) is not None}
    clashes = [
        f"{_flag(k)} {_show(v, k)} (checkpoint: {_show(getattr(saved, k), k)})"
        for k, v in given.items()
        if k in FIXED and not _same(k, v, getattr(saved, k))
    ]
    if clashes:
        raise ConfigError(
            f"{cfg.resume}: cannot change on resume: {', '.join(clashes)}; drop "
            "these flags to continue the run, or start a new run with --out"
        )
    changes = {k: v for k, v in given.items() if k in CHANGEABLE}
    shown = [
        f"{_flag(k)} {_show(v)} (was {_show(getattr(saved, k))})"
        for k, v in changes.items()
        if v != getattr(saved, k)
    ]
    if shown:
        echo(f"resume: applying {', '.join(shown)}")
    if "steps" in changes or "epochs" in changes:
        saved = replace(saved, steps=None, epochs=None)
    out = cfg.out if cfg.out is not None else run_dir_of(ckpt)
    if out is None:
        raise ConfigError(
            f"{cfg.resume}: the checkpoint lies in no run directory "
            "(<run>/checkpoints/); give --out"
        )
    return replace(saved, **changes, out=str(out), resume=str(cfg.resume), overwrite=cfg.overwrite)
