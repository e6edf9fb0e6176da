"""Builds and loads the native CPU kernels (cpu/*.c, cpu/*.cpp) as shared libraries called through
ctypes: a plain C ABI, no torch headers, so a build takes seconds.

Sources are found in $NF4_QLORA_CPU_KERNEL_DIR, the checkout's cpu/, or the installed copy
(<prefix>/share/nf4-qlora/cpu, shipped by pyproject's data-files). A .c file is compiled with $CC (or
cc, gcc), a .cpp file with $CXX (or c++, g++). A build that fails only because the compiler lacks
OpenMP is retried without -fopenmp (e.g. Apple clang: one thread).

Cache: $NF4_KERNEL_CACHE if set, else the torch extensions directory (nf4_cpu/ under it). A library's
name carries a key of its source bytes, flags, compiler and CPU (-march=native builds must not run on
another CPU); it is built into a temporary file and renamed into place, so concurrent builders never
load a half-written library. Anything that stops a build or a load raises `NativeUnavailable`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_libs: dict[tuple[str, tuple[str, ...]], ctypes.CDLL] = {}


class NativeUnavailable(RuntimeError):
    """A native kernel cannot be built or loaded here (no compiler, a compile error, no source)."""


def source_dirs() -> list[Path]:
    """Where kernel sources may lie, in the order searched."""
    dirs = []
    if os.environ.get("NF4_QLORA_CPU_KERNEL_DIR"):
        dirs.append(Path(os.environ["NF4_QLORA_CPU_KERNEL_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        dirs.append(repo / "cpu")
    here = Path(__file__).resolve()  # <prefix>/lib/pythonX.Y/site-packages/backends/torch_backend
    install_prefix = here.parents[5] if len(here.parents) > 5 else None
    for prefix in (sysconfig.get_path("data"), sys.prefix, sys.base_prefix, install_prefix):
        d = None if prefix is None else Path(prefix) / "share" / "nf4-qlora" / "cpu"
        if d is not None and d not in dirs:
            dirs.append(d)
    return dirs


def source_path(name: str) -> Path:
    for d in source_dirs():
        if (d / name).is_file():
            return d / name
    raise NativeUnavailable(f"{name} not found; looked in " + ", ".join(map(str, source_dirs())))


def compiler(source: str) -> str:
    """The compiler for a source file, chosen by its suffix."""
    if source.endswith(".c"):
        found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not found:
            raise NativeUnavailable("no C compiler found (set CC, or install gcc)")
    else:
        found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not found:
            raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")
    return found


def machine_signature() -> str:
    """What -march=native depends on."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return sys.platform


def cache_dir() -> Path:
    if os.environ.get("NF4_KERNEL_CACHE"):
        return Path(os.environ["NF4_KERNEL_CACHE"])
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return Path(_get_build_directory("nf4_cpu", verbose=False))
    except OSError:
        return Path(tempfile.gettempdir()) / "nf4_cpu"


def load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """The library built from cpu/`source` with `flags` (compiled once per source, flags, compiler
    and CPU; cached on disk and per process). The caller declares the functions' signatures."""
    with _lock:
        lib = _libs.get((source, flags))
        if lib is None:
            lib = _libs[(source, flags)] = _build_and_load(source, flags)
        return lib


def _build_and_load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    src = source_path(source)
    cc = compiler(source)
    parts = [src.read_bytes(), " ".join(flags).encode(), cc.encode(), machine_signature().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out_dir = cache_dir()
    lib_path = out_dir / f"{src.stem}_{key}.so"
    if not lib_path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{src.stem}_{key}.{os.getpid()}.{threading.get_ident()}.tmp.so"
        try:
            proc = _compile(cc, flags, src, tmp)
            if proc.returncode != 0 and "-fopenmp" in flags:
                proc = _compile(cc, tuple(f for f in flags if f != "-fopenmp"), src, tmp)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
                raise NativeUnavailable(f"compiling {src.name} failed: {first}")
            os.replace(tmp, lib_path)  # atomic: a concurrent build writes the same bytes
        finally:
            tmp.unlink(missing_ok=True)
    try:
        return ctypes.CDLL(str(lib_path))  # torch's OpenMP runtime (same soname) is reused
    except OSError as exc:
        raise NativeUnavailable(f"loading {lib_path.name} failed: {exc}") from None


def _compile(cc: str, flags: tuple[str, ...], src: Path, out: Path) -> subprocess.CompletedProcess:
    try:
        cmd = [cc, *flags, str(src), "-o", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"could not run the compiler {cc}: {exc}") from None
