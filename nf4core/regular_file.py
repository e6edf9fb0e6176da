"""Refuse paths that are not regular files before opening them: a FIFO or a device would block."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ModelLoadError


def check_regular_file(path: str | os.PathLike, error: type[Exception] = ModelLoadError) -> Path:
    """`path` if it is a regular file (symlinks followed); else `error` naming it and what it is."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file ({_kind(mode)})")
    return path


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"
