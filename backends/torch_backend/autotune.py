"""Autotuning of the Triton kernels' launch configurations: every candidate launch_config offers is
timed once per GPU, kernel, dtype and problem shape, and the fastest is remembered, in the process
and in a JSON file beside the native kernel cache ($NF4_KERNEL_CACHE/triton_autotune.json), so a
later process starts with it.

On by default for CUDA tensors; NF4_AUTOTUNE=0 launches launch_config's first candidate without
timing, =1 also tunes off CUDA (the Triton interpreter in tests, where timings mean nothing). A
file that cannot be read as ours costs one warning line and is tuned again; a remembered choice
that is no longer a candidate (launch_config changed) is tuned again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nf4core.atomic import write_text_atomic

from . import native_build

ENV = "NF4_AUTOTUNE"
FILE_NAME = "triton_autotune.json"
FORMAT, VERSION = "nf4-qlora triton autotune", 1
REPEATS = 5


def enabled(device: torch.device) -> bool:
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 0 (off) or 1 (on; the default on CUDA)")
    return value == "1" or (value == "" and device.type == "cuda")


def row_class(m: int) -> int:
    """Rows rounded up to a power of two: one tuning serves every row count of its class."""
    return 1 << max(m - 1, 0).bit_length()


def median_ms(run: Callable[[], object], device: torch.device) -> float:
    """Median time of `run` over REPEATS calls after a warmup (CUDA events on a GPU)."""
    run()
    times = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(REPEATS):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(REPEATS):
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Autotuner:
    """Chooses among candidate configurations (frozen dataclasses) by timing; see the module doc."""

    def __init__(
        self, path: Path, timer: Callable[[Callable[[], object]], float], device_name: str = ""
    ) -> None:
        self.path, self.timer, self.device_name = path, timer, device_name
        self._choices: dict[str, dict] | None = None
        self.timings: dict[str, dict[str, float]] = {}  # key -> config -> ms timed in this process
        self.chosen: dict[tuple, object] = {}  # the launchers' lookup: one per kernel and shape

    def choose(
        self,
        key: str,
        candidates: Sequence,
        run: Callable[[object], object],
        skip: tuple[type[BaseException], ...] = (),
    ):
        """The fastest of `candidates` for `key`, timing `run(config)` for each the first time; a
        candidate whose run raises one of `skip` (the GPU cannot hold it) is left out. When none
        runs, the first candidate (the caller's launch then reports why)."""
        choices = self._load()
        remembered = choices.get(key)
        for config in candidates:
            if _describe(config) == remembered:
                return config
        timed = {}
        for config in candidates:
            try:
                timed[config] = self.timer(lambda config=config: run(config))
            except skip:
                continue
        if not timed:
            return candidates[0]
        best = min(timed, key=timed.get)
        self.timings[key] = {str(c): ms for c, ms in timed.items()}
        choices[key] = _describe(best)
        self._save(key, choices[key])
        return best

    def choices(self) -> dict[str, dict]:
        return dict(self._load())

    def _load(self) -> dict[str, dict]:
        if self._choices is None:
            self._choices = self._read(warn=True)
        return self._choices

    def _read(self, warn: bool) -> dict[str, dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        else:
            try:
                data = json.loads(text)
            except ValueError:
                problem = "is not valid JSON"
            else:
                if (
                    isinstance(data, dict)
                    and data.get("format") == FORMAT
                    and data.get("version") == VERSION
                    and isinstance(data.get("choices"), dict)
                    and all(isinstance(v, dict) for v in data["choices"].values())
                ):
                    return dict(data["choices"])
                problem = f"is not a version-{VERSION} {FORMAT!r} file"
        if warn:
            warnings.warn(
                f"nf4 autotune: {self.path} {problem}; tuning again", RuntimeWarning, stacklevel=2
            )
        return {}

    def _save(self, key: str, choice: dict) -> None:
        """Merge into what the file holds now (another process may have added to it), atomically."""
        merged = {**self._read(warn=False), key: choice}
        body = dict(format=FORMAT, version=VERSION, choices=merged)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(body, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            warnings.warn(
                f"nf4 autotune: cannot write {self.path} ({exc}); the choice holds for this "
                "process only",
                RuntimeWarning,
                stacklevel=3,
            )


def _describe(config) -> dict:
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


_tuners: dict[torch.device, Autotuner] = {}


def tuner(device: torch.device) -> Autotuner:
    """The process's tuner for `device`, on the file in the kernel cache directory (looked up once:
    the launchers ask on every call)."""
    found = _tuners.get(device)
    if found is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        path = native_build.cache_dir() / FILE_NAME
        found = _tuners[device] = Autotuner(path, lambda run: median_ms(run, device), name)
    return found
