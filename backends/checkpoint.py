"""Training checkpoints, backend-neutral: one directory per save under `<out>/checkpoints/`.

    step-000050/adapters.safetensors   FP32 master adapters, PEFT key names
    step-000050/optimizer.safetensors  `<peft key>.exp_avg`, `.exp_avg_sq` (float32, parameter shape),
                                       `rng.torch` (torch's RNG state; MLX reseeds from (seed, step))
    step-000050/trainer_state.json     format version, step, data position, resolved config
    latest.json                        {"checkpoint": "step-000050"}
    step-000050.1/                     a re-save of step 50 (the old copy goes after the switch)

A checkpoint is written into a hidden temporary directory (every file fsynced), renamed into place in
one step, and only then named by latest.json (written atomically): a failure at any point leaves the
previous checkpoint and pointer intact. Torch and MLX write and read the same names and layouts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nf4core.atomic import _fsync_dir, atomic_file, write_text_atomic

from .checkpoint_schema import FORMAT_VERSION, CheckpointError, read_latest, read_state
from .engine import TrainingState

STATE_NAME, ADAPTERS_NAME, OPTIMIZER_NAME = (
    "trainer_state.json",
    "adapters.safetensors",
    "optimizer.safetensors",
)


class NonFiniteStateError(CheckpointError):
    """A training state to save holds NaN or infinite values."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: TrainingState
    config: dict  # the resolved FinetuneConfig (to_dict)
    data_position: dict  # {"micro_batches": n}
    backend: str


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    with atomic_file(path) as f:
        f.write(blob)


def save_checkpoint(
    root: str | Path, state: TrainingState, config: dict, data_position: dict, backend: str
) -> Path:
    """Write checkpoint `step-<step>` under `root` atomically and name it in latest.json; returns
    its path. A state with non-finite values is refused before anything is written. Re-saving a
    step writes the new copy under a new name (`step-<step>.<n>`), switches latest.json to it, and
    only then deletes the old copy: a crash at any point leaves a complete checkpoint named by
    latest.json (or found by `find_checkpoint`'s fallback). Leftovers of earlier crashes go.
    """
    root = Path(root)
    problem = nonfinite_problem(state)
    if problem:
        raise NonFiniteStateError(f"step {state.step}: {problem}; not saved")
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    name = f"step-{state.step:06d}"
    older = [p for p in _complete(root) if _step_of(p.name) == state.step]
    suffixes = [
        int(m.group(2) or 0)
        for p in root.iterdir()
        if (m := _STEP_NAME.fullmatch(p.name)) and int(m.group(1)) == state.step
    ]
    final = root / (f"{name}.{max(suffixes) + 1}" if suffixes else name)  # newer copies sort later
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        meta = {"format_version": str(FORMAT_VERSION)}
        _save_safetensors(tmp / ADAPTERS_NAME, state.adapters, meta)
        _save_safetensors(tmp / OPTIMIZER_NAME, {**state.moments, **state.rng}, meta)
        info = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "backend": backend,
            "data_position": data_position,
            "config": config,
        }
        write_text_atomic(tmp / STATE_NAME, json.dumps(info, indent=2) + "\n")
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest.json", json.dumps({"checkpoint": final.name}) + "\n")
    for old in older:  # hidden first, so a crash while deleting leaves no half checkpoint in sight
        hidden = root / f".{old.name}.deleted.tmp"
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return final


def nonfinite_problem(state: TrainingState) -> str | None:
    """Which adapter or optimizer moment of `state` is not finite, if any."""
    for group, tensors in (("adapter", state.adapters), ("optimizer moment", state.moments)):
        for key, value in tensors.items():
            if not np.isfinite(value).all():
                return f"the {group} {key} holds NaN or infinite values"
    return None


_STEP_NAME = re.compile(r"step-(\d+)(?:\.(\d+))?")


def _step_of(name: str) -> int | None:
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def _complete(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (renamed into place, so complete), oldest first."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_NAME.fullmatch(p.name)
        if m and (p / STATE_NAME).is_file():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def checkpoint_of_step(root: str | Path, step: int) -> Path | None:
    """The newest complete checkpoint of `step` under `root`, if one is there."""
    found = [p for p in _complete(Path(root)) if _step_of(p.name) == step]
    return found[-1] if found else None


def _remove_leftovers(root: Path) -> None:
    """Temporary directories (`.<name>.tmp`, `.<name>.old`) that a crash left behind."""
    for p in root.iterdir():
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a `checkpoints/` folder, or a run's output folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_NAME).is_file():
            return candidate
        latest = candidate / "latest.json"
        if not latest.exists() and _complete(candidate):  # a crash before the first pointer write
            return _complete(candidate)[-1]
        if latest.is_file():
            target = candidate / read_latest(latest)
            if (target / STATE_NAME).is_file():
                return target
            raise CheckpointError(f"{latest}: names {target.name}, which holds no {STATE_NAME}")
    raise CheckpointError(
        f"{path}: no training checkpoint here (expected {STATE_NAME} or checkpoints/latest.json)"
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = find_checkpoint(path)
    info = read_state(directory / STATE_NAME)
    try:
        adapters = load_file(str(directory / ADAPTERS_NAME))
        opt = load_file(str(directory / OPTIMIZER_NAME))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory}: cannot read the checkpoint tensors ({e})") from e
    rng = {k: v for k, v in opt.items() if k.startswith("rng.")}
    moments = {k: v for k, v in opt.items() if not k.startswith("rng.")}
    problem = _tensor_problem(adapters, moments)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    try:
        state = TrainingState(adapters, moments, int(info["step"]), rng)
        return Checkpoint(
            directory,
            state,
            dict(info["config"]),
            dict(info["data_position"]),
            str(info["backend"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_NAME}: missing or bad field ({e})") from e


def _tensor_problem(adapters: dict[str, np.ndarray], moments: dict[str, np.ndarray]) -> str | None:
    """What is inconsistent between the adapters and their optimizer moments, if anything."""
    if not adapters:
        return f"{ADAPTERS_NAME} holds no adapters"
    for key, value in adapters.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            m = moments.get(f"{key}.{moment}")
            if m is None or m.shape != value.shape:
                return f"{OPTIMIZER_NAME} lacks {key}.{moment} of shape {list(value.shape)}"
        if not np.isfinite(value).all():
            return f"{ADAPTERS_NAME}: {key} holds NaN or infinite values"
        for moment in ("exp_avg", "exp_avg_sq"):
            m = moments[f"{key}.{moment}"]
            if not np.isfinite(m).all():
                return f"{OPTIMIZER_NAME}: {key}.{moment} holds NaN or infinite values"
        if (moments[f"{key}.exp_avg_sq"] < 0).any():
            return f"{OPTIMIZER_NAME}: {key}.exp_avg_sq holds negative values (a second moment)"
    extra = sorted(set(moments) - {f"{k}.{m}" for k in adapters for m in ("exp_avg", "exp_avg_sq")})
    if extra:
        return f"{OPTIMIZER_NAME} holds {extra[0]}, which belongs to no adapter"
    return None


def check_fits(ckpt: Checkpoint, adapters: dict[str, np.ndarray]) -> None:
    """CheckpointError unless the checkpoint's adapters have the names and shapes of `adapters`
    (the freshly built model's)."""
    for key, value in adapters.items():
        saved = ckpt.state.adapters.get(key)
        if saved is None or saved.shape != value.shape:
            got = "nothing" if saved is None else list(saved.shape)
            raise CheckpointError(
                f"{ckpt.path}: {key} is {got} in the checkpoint but "
                f"{list(value.shape)} in the model"
            )
    extra = sorted(set(ckpt.state.adapters) - set(adapters))
    if extra:
        raise CheckpointError(f"{ckpt.path}: the checkpoint has {extra[0]}, which the model lacks")
