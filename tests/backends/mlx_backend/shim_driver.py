"""Compile a Metal kernel body from metal/ as C++ through metal/metal_shim.h and run it on a grid.

The generated driver declares the body's parameters as MLX's generated signature does, then calls the
body once per grid position, one thread after another.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from backends.mlx_backend.metal_sources import KERNELS, find_metal_dir

_C_TYPES = {"uint8_t": np.uint8, "uint32_t": np.uint32, "float": np.float32}


def have_compiler() -> bool:
    return shutil.which("g++") is not None


def _driver_source(name: str, t_type: str, ints: dict[str, int]) -> str:
    spec = KERNELS[name]
    params = [f"const device {c} * {n}" for n, c in spec.inputs]
    params += [f"device {c} * {n}" for n, c in spec.outputs]
    params.append("uint3 thread_position_in_grid")
    lines = [
        '#include "metal_shim.h"',
        "#include <cstdio>",
        "#include <cstdlib>",
        "#include <vector>",
        f"typedef {t_type} T;",
    ]
    lines += [f"constexpr int {k} = {ints[k]};" for k in spec.template_ints]
    lines += [f"static void body({', '.join(params)}) {{", f'#include "{spec.filename}"', "}"]
    lines += [
        "static std::vector<char> slurp(const char* path) {",
        '  FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); rewind(f);',
        "  std::vector<char> v(n + 1); if (n) fread(v.data(), 1, n, f); fclose(f); return v;",
        "}",
        "int main(int argc, char** argv) {",
        "  uint gx = atoi(argv[1]), gy = atoi(argv[2]), gz = atoi(argv[3]); int a = 4;",
    ]
    for i, (_n, _c) in enumerate(spec.inputs):
        lines.append(f"  std::vector<char> in{i} = slurp(argv[a++]);")
    for i, (_n, c) in enumerate(spec.outputs):
        lines.append(f"  const char* outpath{i} = argv[a++]; size_t count{i} = atol(argv[a++]);")
        lines.append(f"  std::vector<{c}> out{i}(count{i});")
    args = [f"reinterpret_cast<const {c}*>(in{i}.data())" for i, (_, c) in enumerate(spec.inputs)]
    args += [f"out{i}.data()" for i in range(len(spec.outputs))]
    lines += [
        "  for (uint z = 0; z < gz; ++z) for (uint y = 0; y < gy; ++y) for (uint x = 0; x < gx; ++x)",
        f"    body({', '.join(args)}, uint3{{x, y, z}});",
    ]
    for i, (_, c) in enumerate(spec.outputs):
        lines += [
            f'  {{ FILE* f = fopen(outpath{i}, "wb");',
            f"    fwrite(out{i}.data(), sizeof({c}), count{i}, f); fclose(f); }}",
        ]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


class ShimKernel:
    """One kernel body compiled with g++ for T = float and fixed template ints."""

    def __init__(self, name: str, workdir: Path, **ints: int) -> None:
        self.spec = KERNELS[name]
        self.workdir = workdir
        tag = "_".join(f"{k}{v}" for k, v in sorted(ints.items()))
        source = workdir / f"{name}_{tag}.cpp"
        self.binary = workdir / f"{name}_{tag}"
        source.write_text(_driver_source(name, "float", ints))
        metal = find_metal_dir()
        subprocess.run(
            [
                "g++",
                "-std=c++17",
                "-O1",
                "-ffp-contract=off",
                "-Wall",
                "-Werror",
                "-Wno-unused-result",
                "-Wno-unused-variable",
                f"-I{metal}",
                str(source),
                "-o",
                str(self.binary),
            ],
            check=True,
            capture_output=True,
            text=True,
        )

    def __call__(
        self, grid: tuple[int, int, int], inputs: dict[str, np.ndarray], out_counts: dict[str, int]
    ) -> dict[str, np.ndarray]:
        argv = [str(self.binary), *map(str, grid)]
        for name, c_type in self.spec.inputs:
            dtype = np.float32 if c_type == "T" else _C_TYPES[c_type]
            array = np.ascontiguousarray(inputs[name], dtype=dtype)
            if array.dtype != np.asarray(inputs[name]).dtype:
                raise TypeError(f"input {name} must be {np.dtype(dtype)}")
            path = self.workdir / f"in_{name}.bin"
            array.tofile(path)
            argv.append(str(path))
        for name, _ in self.spec.outputs:
            argv += [str(self.workdir / f"out_{name}.bin"), str(out_counts[name])]
        subprocess.run(argv, check=True, capture_output=True)
        result = {}
        for name, c_type in self.spec.outputs:
            dtype = np.float32 if c_type == "T" else _C_TYPES[c_type]
            result[name] = np.fromfile(self.workdir / f"out_{name}.bin", dtype=dtype)
        return result
