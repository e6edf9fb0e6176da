"""The CPU NF4 GEMV (cpu/nf4_gemv.cpp): x @ W^T for few rows of x, reading the packed 4-bit codes
instead of a dequantized weight. Built on first use with the system C++ compiler (-O3 -march=native,
OpenMP) into a shared library cached under the torch extensions directory, and called through ctypes
(a plain C ABI: no torch headers, so a build takes seconds). No compiler, or a failed build, raises
`GemvUnavailable`; in auto mode the self-check turns that into one warning and the reference path.

Which calls take it (`covers`): CPU tensors in float32 or bfloat16 (bfloat16 is computed in float32
and rounded once at the end) with few rows, in auto mode once the kernel passed its self-check, or
always with NF4_KERNELS=cpu (forced, unchecked). "Few" depends on the alternative: at most MAX_ROWS
rows while a DequantCache with a budget is active (a dense matmul on a cached weight wins beyond), at
most MAX_ROWS_PER_CALL otherwise (the alternative dequantizes the whole weight per call).
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

import torch

from . import dispatch

SOURCE = "nf4_gemv.cpp"
# Row limits of auto mode, measured with bench/decode_vs_transformers.py (see BENCHMARKS.md).
MAX_ROWS = 8  # vs F.linear on a cached dense weight
MAX_ROWS_PER_CALL = 32  # vs dequantizing the weight for the call
DTYPES = (torch.float32, torch.bfloat16)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_libs: dict[tuple[str, ...], ctypes.CDLL] = {}
_functions: dict[tuple[str, ...], object] = {}  # nf4_gemv_f32 of each build, looked up lock-free


class GemvUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (no compiler, a compile error, no source)."""


def source_dirs() -> list[Path]:
    """Where the kernel source may lie: $NF4_QLORA_CPU_KERNEL_DIR, the checkout's cpu/, then the
    installed copy (<prefix>/share/nf4-qlora/cpu, shipped by pyproject's data-files)."""
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


def source_path() -> Path:
    for d in source_dirs():
        if (d / SOURCE).is_file():
            return d / SOURCE
    raise GemvUnavailable(f"{SOURCE} not found; looked in " + ", ".join(map(str, source_dirs())))


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise GemvUnavailable("no C++ compiler found (set CXX, or install g++)")
    return cxx


def _machine_signature() -> str:
    """What -march=native depends on: a cached build must not run on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return sys.platform


def _build_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return Path(_get_build_directory("nf4_cpu_gemv", verbose=False))
    except OSError:
        return Path(tempfile.gettempdir()) / "nf4_cpu_gemv"


def build(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """Compile (once per source, flags, compiler and CPU; cached on disk) and load the kernel."""
    with _lock:
        if flags in _libs:
            return _libs[flags]
        src = source_path()
        cxx = _compiler()
        text = src.read_bytes()
        key = hashlib.sha256(
            b"\0".join(
                [text, " ".join(flags).encode(), cxx.encode(), _machine_signature().encode()]
            )
        ).hexdigest()[:16]
        out_dir = _build_dir()
        lib_path = out_dir / f"nf4_gemv_{key}.so"
        if not lib_path.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f"nf4_gemv_{key}.{os.getpid()}.tmp.so"
            proc = _compile(cxx, flags, src, tmp)
            if proc.returncode != 0 and "-fopenmp" in flags:  # e.g. Apple clang: one thread
                proc = _compile(cxx, tuple(f for f in flags if f != "-fopenmp"), src, tmp)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
                raise GemvUnavailable(f"compiling {src.name} failed: {first}")
            os.replace(tmp, lib_path)  # atomic: a concurrent build writes the same bytes
        lib = _load(lib_path)
        _libs[flags] = lib
        return lib


def _compile(cxx: str, flags: tuple[str, ...], src: Path, out: Path) -> subprocess.CompletedProcess:
    try:
        cmd = [cxx, *flags, str(src), "-o", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GemvUnavailable(f"could not run the C++ compiler {cxx}: {exc}") from None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # torch is imported: its OpenMP runtime (same soname) is reused
    lib.nf4_gemv_isa.restype = ctypes.c_char_p
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.nf4_gemv_f32.argtypes = [p, i64, i64, p, i64, p, p, p, p, f32, i64, p, i64, p]
    lib.nf4_gemv_f32.restype = ctypes.c_int
    lib.nf4_block_scales.argtypes = [p, p, p, f32, i64, i64, p]
    lib.nf4_block_scales.restype = None
    return lib


def isa(flags: tuple[str, ...] = FLAGS) -> str:
    """The instruction set the build runs on: "avx512", "avx2" or "generic"."""
    return build(flags).nf4_gemv_isa().decode()


def covers(x: torch.Tensor) -> bool:
    """Whether `ops.linear` on input `x` (..., in) takes this kernel now (see the module doc)."""
    if not x.is_cpu or x.dtype not in DTYPES:
        return False
    path = dispatch.requested()
    if path == "cpu":
        return True
    if path != "auto" or "cpu" in dispatch.AUTO_TRITON_DEVICES:  # (tests) auto takes Triton there
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > MAX_ROWS:
        from .dequant_cache import active_cache  # imports ops, which imports this module

        cache = active_cache()
        if rows > MAX_ROWS_PER_CALL or (cache is not None and cache.budget > 0):
            return False
    from . import self_check

    return self_check.cpu_gemv_trusted(x.dtype)


def _gemv(flags: tuple[str, ...]):
    fn = _functions.get(flags)
    if fn is None:
        fn = _functions[flags] = build(flags).nf4_gemv_f32
    return fn


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_parts(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_scales: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    quant_map: torch.Tensor,
    nested_offset: float,
    nested_blocksize: int,
    blocksize: int,
    out_features: int,
    flags: tuple[str, ...] = FLAGS,
) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) in x's dtype, from an NF4 weight's tensors (CPU, contiguous:
    the buffers of an NF4Linear or an NF4Weight). Checks what the kernel would otherwise read past.
    Lean on purpose: decoding calls it ~200 times per token."""
    fn = _gemv(flags)
    in_features = x.shape[-1]
    if packed.numel() != (out_features * in_features + 1) // 2:
        raise ValueError(
            f"nf4 linear: input {tuple(x.shape)} does not fit a weight of {out_features} rows "
            f"and {packed.numel()} packed bytes"
        )
    if not (
        packed.is_contiguous()
        and quant_map.is_contiguous()
        and (absmax is None or absmax.is_contiguous())
        and (nested_codes is None or nested_codes.is_contiguous())
        and (nested_scales is None or nested_scales.is_contiguous())
        and (nested_quant_map is None or nested_quant_map.is_contiguous())
    ):
        raise ValueError("nf4 linear: the CPU kernel needs contiguous NF4 tensors")
    rows = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = torch.empty(x.shape[:-1] + (out_features,), dtype=torch.float32)
    status = fn(
        rows.data_ptr(),
        rows.numel() // in_features,
        in_features,
        packed.data_ptr(),
        out_features,
        _ptr(absmax),
        _ptr(nested_codes),
        _ptr(nested_scales),
        _ptr(nested_quant_map),
        nested_offset,
        nested_blocksize,
        quant_map.data_ptr(),
        blocksize,
        y.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"nf4 linear: the CPU kernel refused blocksize {blocksize}")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear(x: torch.Tensor, w, flags: tuple[str, ...] = FLAGS) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) for an `NF4Weight` w on the CPU, in x's dtype."""
    return linear_parts(
        x,
        w.packed,
        w.absmax,
        w.nested_codes,
        w.nested_scales,
        w.nested_quant_map,
        w.quant_map,
        w.nested_offset,
        w.nested_blocksize,
        w.blocksize,
        w.shape[0],
        flags,
    )
