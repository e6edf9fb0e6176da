"""Helpers for end-to-end run tests: the CLI as a subprocess, byte-for-byte directory snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *map(str, args)]


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` from the repository root; stdout and stderr as text."""
    return subprocess.run(
        cli_command(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def tiny_run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--quiet",
        *extra,
    ]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under `directory`, by relative path."""
    return {
        str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


def error_line(stderr: str) -> str:
    """The single line of a one-line CLI error (asserting there is exactly one, no traceback)."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]
