"""Run a numpy kernel over slices of a large array on several cores (numpy releases the GIL)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child inherits the pool object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def for_each_slice(total: int, step: int, fn: Callable[[int, int], None]) -> None:
    """Call fn(start, stop) for consecutive slices of [0, total) of `step` items (the last one shorter).

    Slices are independent and may run concurrently; `fn` writes its own part of a preallocated output.
    """
    global _pool
    starts = range(0, total, step)
    if len(starts) <= 1 or _workers() == 1:
        for start in starts:
            fn(start, min(start + step, total))
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="nf4core")
    for future in [_pool.submit(fn, s, min(s + step, total)) for s in starts]:
        future.result()
