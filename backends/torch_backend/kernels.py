"""Find and load the Triton kernel sources of `cuda/` by file path (it is not a Python package).

Search order: $NF4_QLORA_KERNEL_DIR, the repository checkout (`<repo>/cuda`), then the installed copy
(`<prefix>/share/nf4-qlora/cuda`, shipped by pyproject's data-files; prefix = the environment's, or the
one this module was installed under with `pip install --prefix`). Loading imports triton, so it
happens only when a kernel is first called, never when the backend is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

KERNEL_FILES = ("nf4_kernels.py",)
_MARKER = "nf4_kernels.py"
_loaded: dict[tuple[str, str], ModuleType] = {}


def candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("NF4_QLORA_KERNEL_DIR"):
        dirs.append(Path(os.environ["NF4_QLORA_KERNEL_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    if (
        repo / "pyproject.toml"
    ).is_file():  # a checkout, not site-packages (whose cuda/ is NVIDIA's)
        dirs.append(repo / "cuda")
    here = Path(__file__).resolve()
    install_prefix = (
        here.parents[5] if len(here.parents) > 5 else None
    )  # <prefix>/lib/pythonX.Y/site-packages/backends/torch_backend
    for prefix in (sysconfig.get_path("data"), sys.prefix, sys.base_prefix, install_prefix):
        if prefix is not None:
            d = Path(prefix) / "share" / "nf4-qlora" / "cuda"
            if d not in dirs:
                dirs.append(d)
    return dirs


def kernel_dir() -> Path:
    """The directory holding our kernel sources; FileNotFoundError lists where it looked."""
    dirs = candidate_dirs()
    for d in dirs:
        if (d / _MARKER).is_file():
            return d
    raise FileNotFoundError(
        "Triton kernel sources not found; looked in " + ", ".join(map(str, dirs))
    )


def load_kernel_module(filename: str) -> ModuleType:
    """Import `cuda/<filename>` by path, once per TRITON_INTERPRET setting."""
    if filename not in KERNEL_FILES:
        raise ValueError(f"unknown kernel file {filename!r}; known: {KERNEL_FILES}")
    key = (filename, os.environ.get("TRITON_INTERPRET", "0"))
    if key not in _loaded:
        path = kernel_dir() / filename
        name = f"_nf4_qlora_kernels_{Path(filename).stem}_{len(_loaded)}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # triton.jit inspects the defining module's source
        spec.loader.exec_module(module)
        _loaded[key] = module
    return _loaded[key]
