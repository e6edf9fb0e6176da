"""What a run reports: a JSONL metrics log, progress displays, and the loss-curve PNG.

Progress goes to stderr. On a terminal a display rewrites its line (`\r`); anywhere else (a log
file, a pipe) it prints plain lines, at most one per `every` seconds besides the first and the last.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nf4core.atomic import atomic_file, os_errors_name


class MetricsLog:
    """Appends one JSON object per line (flushed, so a crash keeps what was logged)."""

    def __init__(self, path: Path, create: bool = True) -> None:
        """`create` False: only read (the other ranks of a run read the main rank's log)."""
        self.path = path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with os_errors_name(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record; a line cut short by a crash is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resumed run logs them again), atomically."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_file(self.path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """`step 12/150 [####....] loss 1.234 | 345 tok/s | ETA 3m10s` on one line of `stream` (a
    terminal), or as plain lines at most every `every` seconds (anything else)."""

    def __init__(
        self, total: int, start: int = 0, stream=None, enabled: bool = True, every: float = 10.0
    ) -> None:
        self.total, self.start, self.stream, self.enabled = (
            total,
            start,
            stream or sys.stderr,
            enabled,
        )
        self.t0, self.tokens = time.perf_counter(), 0
        self.terminal, self.every, self._shown = is_terminal(self.stream), every, None
        self._unshown: str | None = None  # a log's latest line, until written

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else 0.0
        filled = int(20 * step / max(1, self.total))
        line = (
            f"step {step}/{self.total} [{'#' * filled}{'.' * (20 - filled)}] loss {loss:.4f}"
            f" | {rate:.0f} tok/s | ETA {_duration(eta)}"
        )
        if not self.enabled:
            return
        if self.terminal:
            self.stream.write("\r" + line)
        elif self._due(step == self.total):
            self.stream.write(line + "\n")
            self._unshown = None
        else:
            self._unshown = line
        self.stream.flush()

    def _due(self, last: bool) -> bool:
        now = time.perf_counter()
        if last or self._shown is None or now - self._shown >= self.every:
            self._shown = now
            return True
        return False

    def close(self) -> None:
        """Ends the line on a terminal; a log gets the last step's line if it was held back (a run
        that stopped before its planned last step)."""
        if not self.enabled:
            return
        if self.terminal:
            self.stream.write("\n")
        elif self._unshown is not None:
            self.stream.write(self._unshown + "\n")
            self._unshown = None
        self.stream.flush()


class PhaseDisplay:
    """Start lines and counters for a run's long phases (loading, evaluating, saving, exporting)."""

    def __init__(self, stream=None, enabled: bool = True, every: float = 10.0) -> None:
        self.stream, self.enabled, self.every = stream or sys.stderr, enabled, every
        self.terminal = is_terminal(self.stream)
        self._lock = threading.Lock()

    @contextmanager
    def phase(
        self, label: str, total: int | None = None, log_delay: float = 0.0
    ) -> Iterator[PhaseCounter]:
        """`label ...` now, `label: done in 3s` at the end; the counter's `update(done)` shows
        `label: done/total` between (in place on a terminal). With `log_delay`, a log (not a
        terminal) gets the lines only once the phase has lasted that long: a phase that reads the
        user's input, and may fail on it at once, leaves the error the only line there."""
        counter = PhaseCounter(self, label, total)
        timer = None
        delay = 0.0 if self.terminal else log_delay
        if delay > 0:
            timer = threading.Timer(delay, counter.start)
            timer.daemon = True
            timer.start()
        else:
            counter.start()
        try:
            yield counter
        except BaseException:
            if timer is not None:
                timer.cancel()
            if counter.started and self.enabled and self.terminal:  # the error on its own line
                self._write("", final=True)
            raise
        if timer is not None:
            timer.cancel()
        if counter.started:
            self._write(f"{label}: done in {_duration(counter.elapsed)}", final=True)

    def _write(self, text: str, final: bool) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.terminal:
                self.stream.write("\r" + text.ljust(60) + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()


class PhaseCounter:
    def __init__(self, display: PhaseDisplay, label: str, total: int | None) -> None:
        self.display, self.label, self.total = display, label, total
        self.t0 = self._shown = time.perf_counter()
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.display._write(f"{self.label} ...", final=not self.display.terminal)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, done: int, total: int | None = None) -> None:
        total = total if total is not None else self.total
        now = time.perf_counter()
        if not self.started or (
            not self.display.terminal and now - self._shown < self.display.every
        ):
            return
        self._shown = now
        of = f"/{total}" if total is not None else ""
        self.display._write(f"{self.label}: {done}{of}", final=False)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def plot_loss(records: list[dict], path: Path) -> Path | None:
    """loss.png of the training (and eval) loss by step; None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png")
    return path
