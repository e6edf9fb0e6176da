"""Shared by the memory benchmarks: run a job in a fresh Python process and read its peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys

# Prepended to each child's code: `status()` reads this process's current and peak resident memory.
STATUS = r"""
import json, sys, time
def status():
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return {k: int(d[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}
"""


def run_child(code: str, *args: str) -> dict:
    """Run STATUS + `code` with `args` in a new interpreter; its last stdout line is a JSON object
    (or {"error": last stderr line})."""
    proc = subprocess.run(
        [sys.executable, "-c", STATUS + code, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
