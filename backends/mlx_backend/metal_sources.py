"""The Metal kernel bodies in metal/: their signatures, and where to find the files (no mlx needed).

The bodies are loaded by file path. In a source checkout they sit in <repo>/metal; a non-editable
install ships them as data files under <prefix>/share/nf4-qlora/metal (pyproject's data-files). The
loader looks in the checkout first, then in the install prefixes.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SHARE_SUBDIR = Path("share") / "nf4-qlora" / "metal"
ENV_DIR = "NF4_QLORA_METAL_DIR"  # overrides the search (a folder holding the .metal files)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its file, parameters (name, C type; "T" is the template type) and template ints."""

    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    template_ints: tuple[str, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.metal"

    @property
    def input_names(self) -> list[str]:
        return [n for n, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.outputs]


_WEIGHT = (("packed", "uint8_t"), ("absmax", "float"), ("quant_map", "float"), ("dims", "uint32_t"))

KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec(
            "nf4_absmax_scale",
            (
                ("dq_codes", "uint8_t"),
                ("dq_scales", "float"),
                ("dq_quant_map", "float"),
                ("dims", "uint32_t"),
            ),
            (("scaled", "float"),),
            ("DQ_BS",),
        ),
        KernelSpec(
            "nf4_absmax_offset",
            (("scaled", "float"), ("offset", "float"), ("dims", "uint32_t")),
            (("absmax", "float"),),
            (),
        ),
        KernelSpec("nf4_dequant", _WEIGHT, (("out", "T"),), ("BS",)),
        KernelSpec("nf4_matmul", (("x", "T"), *_WEIGHT), (("y", "T"),), ("BS",)),
        KernelSpec("nf4_matmul_t", (("dy", "T"), *_WEIGHT), (("dx", "T"),), ("BS",)),
        KernelSpec("nf4_gemv", (("x", "T"), *_WEIGHT), (("y", "T"),), ("BS", "ROWS")),
    )
}


def _candidates() -> list[Path]:
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    here = Path(__file__).resolve()
    dirs.append(here.parents[2] / "metal")  # a source checkout
    if len(here.parents) > 5:  # <prefix>/lib/pythonX.Y/site-packages/backends/mlx_backend/
        dirs.append(here.parents[5] / SHARE_SUBDIR)  # installed with --prefix or --user
    prefixes = [sys.prefix, sysconfig.get_path("data")]
    if site.ENABLE_USER_SITE:
        prefixes.append(site.getuserbase())
    dirs.extend(Path(p) / SHARE_SUBDIR for p in prefixes if p)
    return dirs


def find_metal_dir(candidates: list[Path] | None = None) -> Path:
    """The first folder holding every kernel file; FileNotFoundError lists where it looked."""
    candidates = _candidates() if candidates is None else candidates
    for folder in candidates:
        if all((folder / spec.filename).is_file() for spec in KERNELS.values()):
            return folder
    raise FileNotFoundError(
        "the Metal kernel sources (metal/*.metal) were not found; looked in: "
        + ", ".join(str(c) for c in candidates)
        + f". Reinstall nf4-qlora or set {ENV_DIR}."
    )


@functools.cache
def load_source(name: str) -> str:
    """The body of kernel `name`, read from its .metal file."""
    if name not in KERNELS:
        raise KeyError(f"unknown Metal kernel {name!r}; known: {sorted(KERNELS)}")
    return (find_metal_dir() / KERNELS[name].filename).read_text()
