"""`FinetuneConfig`: every setting of a fine-tuning run, how defaults are filled, and the LR schedule.

Precedence: explicit values (command line / Python) > a config file > the built-in task's recommended
settings (default data) or generic defaults. Unset fields are None until `resolve()` fills them, so
"explicitly set" is always visible (resume uses that).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from nf4core.data_formats import FORMATS
from nf4core.model_config import LINEAR_NAMES
from nf4core.model_quantize import DEFAULT_QUANT_METHOD
from nf4core.regular_file import check_regular_file
from nf4core.tensor import QUANT_METHODS

from .schedule import SCHEDULES, learning_rate_at

CONFIG_VERSION = 1
GENERIC_DEFAULTS = {
    "steps": 100,
    "lr": 2e-4,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "batch_size": 4,
    "max_seq_len": 512,
    "targets": list(LINEAR_NAMES),
}
FIXED_DEFAULTS = {
    "grad_accum": 1,
    "lora_dropout": 0.0,
    "use_dora": False,
    "seed": 0,
    "grad_checkpoint": False,
    "eval_every": 0,
    "save_every": 0,
    "warmup_steps": 0,
    "schedule": "cosine",
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "export": (),
    "out": "finetune-out",
    "eval_max_examples": 0,
    "overwrite": False,
    "skip_nonfinite": 0,
    "strict_data": False,
    "base_dtype": "nf4",
    "quant_method": DEFAULT_QUANT_METHOD,
    "data_format": "auto",
    "packing": False,
    "early_stopping_patience": 0,
    "report_to": (),
}
BASE_DTYPES = ("nf4", "bfloat16", "float32")
# what a checkpoint written before these settings existed was trained with
LEGACY_BASE = {
    "base_dtype": "nf4",
    "quant_method": "absmax",
    "data_format": "auto",
    "use_dora": False,
    "packing": False,
}
DATA_FORMATS = ("auto", *FORMATS)
EXPORTS = ("mlx-lm", "gguf")
REPORTERS = ("tensorboard", "wandb")


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run. `model` None: the embedded SmolLM2-135M-Instruct; `data` None: the built-in
    task (nf4core.default_task), whose `recommended` settings then fill unset fields."""

    model: str | None = None
    data: str | None = None
    data_format: str | None = None  # "auto" or one of nf4core.data_formats.FORMATS
    out: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    max_seq_len: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    targets: tuple[str, ...] | None = None
    use_dora: bool | None = None  # DoRA: a trained magnitude per output row (PEFT's use_dora)
    seed: int | None = None
    backend: str | None = None
    device: str | None = None
    compute_dtype: str | None = None
    grad_checkpoint: bool | None = None
    paged_optimizer: bool | None = None  # None: the backend's default (paged on GPUs)
    max_grad_norm: float | None = None
    weight_decay: float | None = None
    eval_every: int | None = None
    eval_max_examples: int | None = None  # 0: the whole held-out set
    save_every: int | None = None
    resume: str | None = None
    export: tuple[str, ...] | None = None
    overwrite: bool | None = None  # move a non-empty `out` aside (`<out>.old-<n>`), start afresh
    skip_nonfinite: int | None = None  # steps with a NaN/Inf loss or gradient skipped, at most
    strict_data: bool | None = None  # refuse records without target tokens instead of skipping them
    base_dtype: str | None = None  # "nf4" (QLoRA), or "bfloat16"/"float32": plain LoRA, unquantized
    quant_method: str | None = None  # quantize-on-load of a 16/32-bit base: "absmax" or "mse"
    packing: bool | None = None  # examples laid end to end in rows of max_seq_len tokens
    early_stopping_patience: int | None = None  # stop after N evaluations without improvement
    report_to: tuple[str, ...] | None = None  # also log metrics to "tensorboard" and/or "wandb"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.targets is not None:
            t = self.targets
            t = [s.strip() for s in t.split(",")] if isinstance(t, str) else list(t)
            if not t or not all(t):
                raise ConfigError(f"targets must name modules, got {self.targets!r}")
            object.__setattr__(self, "targets", tuple(t))
        if self.export is not None:
            e = (self.export,) if isinstance(self.export, str) else tuple(self.export)
            bad = [x for x in e if x not in EXPORTS]
            if bad:
                raise ConfigError(f"export: unknown format {bad[0]!r}; choose from {EXPORTS}")
            object.__setattr__(self, "export", e)
        if self.report_to is not None:
            e = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
            bad = [x for x in e if x not in REPORTERS]
            if bad:
                raise ConfigError(f"report_to: unknown logger {bad[0]!r}; choose from {REPORTERS}")
            object.__setattr__(self, "report_to", e)
        for name in ("steps", "batch_size", "grad_accum", "max_seq_len", "lora_r"):
            _check_int(self, name, 2 if name == "max_seq_len" else 1)
        for name in (
            "warmup_steps",
            "seed",
            "eval_every",
            "save_every",
            "eval_max_examples",
            "skip_nonfinite",
            "early_stopping_patience",
        ):
            _check_int(self, name, 0)
        for name in ("lr", "lora_alpha", "epochs"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        for name in ("lora_dropout", "max_grad_norm", "weight_decay"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError(
                f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"
            )
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise ConfigError(
                f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}"
            )
        if self.base_dtype is not None and self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if self.quant_method is not None and self.quant_method not in QUANT_METHODS:
            raise ConfigError(
                f"quant_method must be one of {QUANT_METHODS}, got {self.quant_method!r}"
            )
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")

    # -- sources ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        """The settings of a YAML (or JSON) file as a dict of known fields; ConfigError names the file."""
        import yaml

        try:
            if Path(path).exists():
                check_regular_file(path, ConfigError)
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        except RecursionError as e:
            raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        bad_key = next((k for k in data if not isinstance(k, str)), None)
        if bad_key is not None:
            raise ConfigError(f"{path}: setting names must be strings, got {bad_key!r}")
        data = {k.replace("-", "_"): v for k, v in data.items() if k != "config_version"}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: unknown setting {unknown[0]!r}")
        try:
            cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        return data

    @classmethod
    def merged(cls, explicit: dict, file_settings: dict | None = None) -> FinetuneConfig:
        """Explicit (non-None) values over the file's."""
        values = dict(file_settings or {})
        values.update({k: v for k, v in explicit.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(str(e)) from e

    def resolve(self, recommended: dict | None) -> FinetuneConfig:
        """Every unset field filled: from `recommended` (the built-in task) or generic defaults."""
        base = {**GENERIC_DEFAULTS, **(recommended or {})}
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in base and not (f.name == "steps" and self.epochs is not None):
                v = base[f.name]
            if v is None and f.name in FIXED_DEFAULTS:
                v = FIXED_DEFAULTS[f.name]
            values[f.name] = v
        return replace(self, **values)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("targets", "export", "report_to"):
            if d[k] is not None:
                d[k] = list(d[k])
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        if d.get("config_version") != CONFIG_VERSION:
            raise ConfigError(f"unknown config version {d.get('config_version')!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)} - {"config_version"})
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}")
        return cls(**{k: v for k, v in d.items() if k != "config_version"})


_TEXT_FIELDS = ("model", "data", "out", "backend", "device", "compute_dtype", "resume")
_FLAG_FIELDS = (
    "grad_checkpoint",
    "paged_optimizer",
    "overwrite",
    "strict_data",
    "use_dora",
    "packing",
)


def _check_types(cfg: FinetuneConfig) -> None:
    """Paths and names are strings and switches are booleans (a YAML file can give anything)."""
    for name in _TEXT_FIELDS:
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise ConfigError(f"{name} must be a string, got {v!r}")
        if isinstance(v, str) and (not v or "\0" in v):
            raise ConfigError(
                f"{name} must be a non-empty string without NUL characters, got {v!r}"
            )
    for name in _FLAG_FIELDS:
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
    for name in ("targets", "export", "report_to"):
        v = getattr(cfg, name)
        if v is not None and not (
            isinstance(v, str)
            or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))
        ):
            raise ConfigError(f"{name} must be a list of names, got {v!r}")


MAX_INT = 2**63 - 1  # what torch and numpy take as a seed or a count


def _check_int(cfg: FinetuneConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")
    if v is not None and v > MAX_INT:
        raise ConfigError(f"{name} must be at most {MAX_INT}, got {v}")


def learning_rate(cfg: FinetuneConfig, step: int, total_steps: int) -> float:
    """The LR of optimizer step `step` (0-based) under the run's schedule (`backends.schedule`)."""
    return learning_rate_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.schedule)
