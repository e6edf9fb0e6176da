"""glibc malloc settings for a CPU training process: keep freed memory for the next step.

A training step frees and reallocates the same activation sizes every step. By default glibc hands
memory at the top of its heap back to the kernel once 128 KiB are free there and adapts its mmap
threshold as blocks come and go; the next step then takes page faults and zeroes pages again. Here
the heap keeps up to 2 GiB of free memory at its top and grows by 256 MiB at a time (setting these
also fixes the mmap threshold at glibc's 128 KiB default). Measured on the default model (batch
4 x 128, 2-core AMD EPYC, bench/vs_peft.py): with gradient checkpointing 227 instead of 169 tokens/s,
without it 298 instead of 265-281, peaks within 4% (BENCHMARKS.md). A fixed 32 MiB mmap threshold
was slower (169 tokens/s with checkpointing) and is not set. Only for glibc on Linux; elsewhere
nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_TOP_PAD = -1, -2
SETTINGS = ((M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20))
_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process; whether glibc accepted them all."""
    if _applied:
        return _applied[0]
    ok = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    _applied.append(ok)
    return ok
