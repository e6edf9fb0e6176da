"""What a run reports: a JSONL metrics log, a one-line progress display, and the loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nf4core.atomic import atomic_file, os_errors_name


class MetricsLog:
    """Appends one JSON object per line (flushed, so a crash keeps what was logged)."""

    def __init__(self, path: Path) -> None:
        self.path = path
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


class Progress:
    """`step 12/150 [####....] loss 1.234 | 345 tok/s | ETA 3m10s` on one line of `stream`."""

    def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True) -> None:
        self.total, self.start, self.stream, self.enabled = (
            total,
            start,
            stream or sys.stderr,
            enabled,
        )
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else 0.0
        filled = int(20 * step / max(1, self.total))
        line = (
            f"\rstep {step}/{self.total} [{'#' * filled}{'.' * (20 - filled)}] loss {loss:.4f}"
            f" | {rate:.0f} tok/s | ETA {_duration(eta)}"
        )
        if self.enabled:
            self.stream.write(line)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


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
