"""A test double of `mx.fast.metal_kernel` for Linux, where there is no Metal.

It takes what MLX takes (name, input_names, output_names, source, header, ensure_row_contiguous,
compile_options; then the call with inputs, grid, threadgroup, template, output_shapes,
output_dtypes), writes the kernel's signature by MLX's rules, compiles it as C++ through
metal/metal_shim.h, and runs it over the grid, one thread after another, with the thread-position
variables set for each thread. MLX's rules it follows (read from MLX's custom_kernel.cpp):
- an input of fewer than 8 elements is `const constant T*`, a larger one `const device T*`, and a
  0-d input is passed by reference (`const constant T&`), so indexing it does not compile;
- outputs are `device T*`; `<name>_shape` / `_strides` / `_ndim` parameters are added for an input
  whose name with that suffix appears in the source; a thread attribute (thread_position_in_grid,
  ...) is a parameter only if the source uses it;
- template values are types (mx.Dtype), ints or bools, nothing else;
- grid and threadgroup count threads (dispatchThreads): the last threadgroup of a dimension may be
  partial, threads past the grid do not run; each threadgroup dimension is clamped to the grid's.
  Zero-sized grids or threadgroups and threadgroups over 1024 threads (checked before the clamp)
  are refused, as Metal refuses them;
- at least one output; `output_shapes` and `output_dtypes` as long as `output_names`; inputs as
  many as `input_names`; `compile_options` a dict whose only key is math_mode (safe, relaxed,
  fast); a template int must fit a C int;
- names the Metal compiler would refuse (not an identifier, an address-space keyword such as
  `device`, or a name used twice) fail to build, as MLX's library build fails.
What MLX runs but the double cannot emulate is refused by name (NotImplementedError): atomic
outputs, ensure_row_contiguous=False, simdgroup and quadgroup functions, and the thread attributes
it does not set (threadgroups_per_grid, grid_size, grid_origin, thread_execution_width, ...).
Outputs start as all-ones bytes (NaN for floats), so an element no thread writes shows up, or as
`init_value` where one is given (MLX fills them with it).
Each generated source compiles once per process.
"""

from __future__ import annotations

import hashlib
import keyword
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from backends.mlx_backend._mlx import mx
from backends.mlx_backend.metal_sources import find_metal_dir

MAX_THREADS_PER_THREADGROUP = 1024
CONSTANT_MAX_ELEMENTS = 8  # MLX: inputs with fewer elements go to the constant address space
_ATTRIBUTES = {  # Metal thread attributes the double can set; MLX adds the ones the source names
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threads_per_threadgroup": "uint3",
    "threads_per_grid": "uint3",
    "thread_index_in_threadgroup": "uint",
}
# Attributes MLX also passes (it adds any it finds in the source) that the double cannot set: refused
# by name rather than left to a confusing compile error.
_UNSUPPORTED_ATTRIBUTES = (
    "simdgroup",
    "quadgroup",
    "thread_execution_width",
    "threadgroups_per_grid",
    "dispatch_threads_per_threadgroup",
    "grid_origin",
    "grid_size",
)
# Words a Metal parameter cannot be named (address spaces, function qualifiers); the shim defines
# several of them away for C++, so the double checks them itself.
_METAL_KEYWORDS = frozenset(
    {"device", "constant", "threadgroup", "thread", "kernel", "vertex", "fragment", "half"}
)
C_INT_MAX = 2**31 - 1


def _c_type(dtype) -> str:
    types = _c_types()
    if dtype not in types:
        raise TypeError(f"[metal_kernel] the Metal double has no {dtype} arrays")
    return types[dtype]


def _c_types() -> dict:
    return {
        mx.float32: "float",
        mx.float16: "float16_t",
        mx.bfloat16: "bfloat16_t",
        mx.uint8: "uint8_t",
        mx.uint16: "uint16_t",
        mx.uint32: "uint32_t",
        mx.int32: "int32_t",
        mx.int64: "int64_t",
        mx.bool_: "bool",
    }


def _raw(a: mx.array) -> bytes:
    """The array's bytes, row-major."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)).tobytes()


def _from_raw(data: bytes, shape: tuple, dtype) -> mx.array:
    storage = {
        mx.bfloat16: np.uint16,
        mx.float16: np.float16,
        mx.float32: np.float32,
        mx.uint8: np.uint8,
        mx.uint16: np.uint16,
        mx.uint32: np.uint32,
        mx.int32: np.int32,
        mx.int64: np.int64,
        mx.bool_: np.bool_,
    }[dtype]
    out = mx.array(np.frombuffer(data, dtype=storage).reshape(shape))
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


_workdir: Path | None = None
_binaries: dict[str, Path] = {}
compile_count = 0  # how many sources were compiled this process (tests keep it small)


def _compile(cpp: str, fast_math: bool) -> Path:
    global _workdir, compile_count
    key = hashlib.sha256((cpp + str(fast_math)).encode()).hexdigest()[:20]
    if key not in _binaries:
        if _workdir is None:
            _workdir = Path(tempfile.mkdtemp(prefix="metal_double_"))
        source, binary = _workdir / f"{key}.cpp", _workdir / key
        source.write_text(cpp)
        proc = subprocess.run(
            [
                "g++",
                "-std=c++17",
                "-O1",
                f"-ffp-contract={'fast' if fast_math else 'off'}",
                "-Wall",
                "-Werror",
                "-Wno-unused-variable",
                "-Wno-unused-but-set-variable",
                f"-I{find_metal_dir()}",
                str(source),
                "-o",
                str(binary),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr)
            raise RuntimeError(f"[metal_kernel] Unable to build metal library from source: {first}")
        compile_count += 1
        _binaries[key] = binary
    return _binaries[key]


def _template_header(template: list) -> tuple[str, str]:
    """(`template <...>`, `<...>` arguments) from MLX-style [(name, value), ...]."""
    params, args = [], []
    for name, value in template:
        if isinstance(value, bool):
            params.append(f"bool {name}")
            args.append("true" if value else "false")
        elif isinstance(value, int):
            if not -C_INT_MAX - 1 <= value <= C_INT_MAX:
                raise TypeError(f"[metal_kernel] template argument {name!r} does not fit an int")
            params.append(f"int {name}")
            args.append(str(value))
        elif isinstance(value, mx.Dtype):
            params.append(f"typename {name}")
            args.append(_c_type(value))
        else:
            raise TypeError(
                f"[metal_kernel] template argument {name!r} must be an int, a bool or "
                f"a Dtype, got {type(value).__name__}"
            )
    return (f"template <{', '.join(params)}>" if params else ""), (
        f"<{', '.join(args)}>" if args else ""
    )


class MetalKernelDouble:
    """Stands in for the object mx.fast.metal_kernel returns."""

    def __init__(
        self,
        name: str,
        input_names,
        output_names,
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: dict | None = None,
    ) -> None:
        if atomic_outputs:
            raise NotImplementedError("the Metal double has no atomic outputs")
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if compile_options is not None and not isinstance(compile_options, dict):
            raise ValueError("[metal_kernel] Expected `compile_options` to be a dict.")
        options = dict(compile_options or {})
        for key in set(options) - {"math_mode"}:
            raise ValueError(f"[metal_kernel] Unknown compile option `{key}`.")
        if options.get("math_mode", "safe") not in ("safe", "relaxed", "fast"):
            raise ValueError(
                "[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or 'fast'."
            )
        if not ensure_row_contiguous:  # MLX then passes strided memory as is; the double cannot
            raise NotImplementedError("the Metal double has no ensure_row_contiguous=False")
        for attr in _UNSUPPORTED_ATTRIBUTES:
            if attr in source:
                raise NotImplementedError(f"the Metal double cannot run {attr} functions")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.ensure_row_contiguous = ensure_row_contiguous
        self.fast_math = options.get("math_mode", "safe") != "safe"
        self.calls = []  # (grid, threadgroup) of every call

    def _signature(self, inputs: list[mx.array]) -> tuple[list[str], list[str]]:
        """Parameters as MLX writes them, and the driver's matching arguments."""
        params, args = [], []
        for i, (name, a) in enumerate(zip(self.input_names, inputs)):
            space = "constant" if a.size < CONSTANT_MAX_ELEMENTS else "device"
            c_type = _c_type(a.dtype)
            if a.ndim == 0:
                params.append(f"const {space} {c_type}& {name}")
                args.append(f"*reinterpret_cast<const {c_type}*>(in{i}.data())")
            else:
                params.append(f"const {space} {c_type}* {name}")
                args.append(f"reinterpret_cast<const {c_type}*>(in{i}.data())")
                for suffix, c, values in (
                    ("_shape", "int", a.shape),
                    ("_strides", "int64_t", _row_strides(a.shape)),
                ):
                    if name + suffix in self.source:
                        params.append(f"const constant {c}* {name}{suffix}")
                        args.append(f"std::vector<{c}>{{{', '.join(map(str, values))}}}.data()")
                if name + "_ndim" in self.source:
                    params.append(f"const constant int& {name}_ndim")
                    args.append(str(a.ndim))
        for j, name in enumerate(self.output_names):
            params.append(f"device {{OUT{j}}}* {name}")
            args.append(f"reinterpret_cast<{{OUT{j}}}*>(out{j}.data())")
        for attr, c_type in _ATTRIBUTES.items():
            if attr in self.source:
                params.append(f"{c_type} {attr}")
                args.append(attr)
        return params, args

    def _program(self, inputs, output_dtypes, template) -> str:
        header_line, template_args = _template_header(template)
        params, args = self._signature(inputs)
        out_types = {f"{{OUT{j}}}": _c_type(d) for j, d in enumerate(output_dtypes)}
        fn = f"custom_kernel_{self.name}"
        lines = [
            '#include "metal_shim.h"',
            "#include <cstdio>",
            "#include <cstdlib>",
            "#include <vector>",
            self.header,
            header_line,
            f"static void {fn}({', '.join(params)}) {{",
            self.source,
            "}",
            "static std::vector<char> slurp(const char* path) {",
            '  FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f);',
            "  rewind(f); std::vector<char> v(n + 8);",
            "  if (n) { size_t r = fread(v.data(), 1, n, f); (void)r; } fclose(f); return v;",
            "}",
            "int main(int argc, char** argv) {",
            "  uint g[3], t[3]; int a = 1;",
            "  for (int d = 0; d < 3; ++d) g[d] = atoi(argv[a++]);",
            "  for (int d = 0; d < 3; ++d) t[d] = atoi(argv[a++]);",
        ]
        lines += [f"  std::vector<char> in{i} = slurp(argv[a++]);" for i in range(len(inputs))]
        for j in range(len(output_dtypes)):
            lines += [
                f"  const char* outpath{j} = argv[a++]; size_t bytes{j} = atol(argv[a++]);",
                f"  std::vector<char> out{j} = slurp(outpath{j});",
            ]
        call = ", ".join(args)
        lines += [
            "  uint3 threads_per_grid{g[0], g[1], g[2]};",
            "  uint3 threads_per_threadgroup{t[0], t[1], t[2]};",
            "  for (uint gz = 0; gz * t[2] < g[2]; ++gz)",
            "  for (uint gy = 0; gy * t[1] < g[1]; ++gy)",
            "  for (uint gx = 0; gx * t[0] < g[0]; ++gx)",
            "  for (uint lz = 0; lz < t[2]; ++lz) for (uint ly = 0; ly < t[1]; ++ly)",
            "  for (uint lx = 0; lx < t[0]; ++lx) {",
            "    uint3 threadgroup_position_in_grid{gx, gy, gz};",
            "    uint3 thread_position_in_threadgroup{lx, ly, lz};",
            "    uint thread_index_in_threadgroup = (lz * t[1] + ly) * t[0] + lx;",
            "    uint3 thread_position_in_grid{gx * t[0] + lx, gy * t[1] + ly, gz * t[2] + lz};",
            "    if (thread_position_in_grid.x >= g[0] || thread_position_in_grid.y >= g[1] ||",
            "        thread_position_in_grid.z >= g[2]) continue;  // dispatchThreads: partial",
            "    (void)threads_per_grid; (void)threads_per_threadgroup;",
            "    (void)threadgroup_position_in_grid; (void)thread_position_in_threadgroup;",
            "    (void)thread_index_in_threadgroup;",
            f"    {fn}{template_args}({call});",
            "  }",
        ]
        for j in range(len(output_dtypes)):
            lines += [
                f'  {{ FILE* f = fopen(outpath{j}, "wb");',
                f"    fwrite(out{j}.data(), 1, bytes{j}, f); fclose(f); }}",
            ]
        lines += ["  return 0;", "}"]
        program = "\n".join(lines) + "\n"
        for placeholder, c_type in out_types.items():
            program = program.replace(placeholder, c_type)
        return program

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size "
                f"{len(self.input_names)} but got size {len(inputs)}."
            )
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(
            self.output_names
        ):
            raise ValueError(
                f"[metal_kernel] Expected `output_shapes` and `output_dtypes` to have "
                f"size {len(self.output_names)}."
            )
        grid, threadgroup = tuple(grid), tuple(threadgroup)
        for what, dims in (("grid", grid), ("threadgroup", threadgroup)):
            if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
                raise ValueError(f"[metal_kernel] {what} must be three positive ints, got {dims}")
        if int(np.prod(threadgroup)) > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"[metal_kernel] threadgroup {threadgroup} has more than "
                f"{MAX_THREADS_PER_THREADGROUP} threads"
            )
        threadgroup = tuple(min(t, g) for t, g in zip(threadgroup, grid))  # as MLX dispatches
        if init_value is not None and not isinstance(init_value, (int, float)):
            raise TypeError(f"[metal_kernel] init_value must be a float, got {init_value!r}")
        self._check_names()
        inputs = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
        binary = _compile(self._program(inputs, output_dtypes, template or []), self.fast_math)
        self.calls.append((grid, threadgroup))
        with tempfile.TemporaryDirectory(dir=_workdir) as tmp:
            argv = [str(binary), *map(str, grid), *map(str, threadgroup)]
            for i, a in enumerate(inputs):
                path = Path(tmp) / f"in{i}"
                path.write_bytes(_raw(a))
                argv.append(str(path))
            for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
                start = _initial_output(tuple(shape), dtype, init_value)
                (Path(tmp) / f"out{j}").write_bytes(start)
                argv += [str(Path(tmp) / f"out{j}"), str(len(start))]
            subprocess.run(argv, check=True, capture_output=True)
            return [
                _from_raw((Path(tmp) / f"out{j}").read_bytes(), tuple(shape), dtype)
                for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes))
            ]

    def _check_names(self) -> None:
        """What the Metal compiler refuses in the generated signature, refused before g++ runs
        (the shim defines address-space words away, so g++ alone would accept some of them)."""
        names = self.input_names + self.output_names
        for name in names:
            if not name.isidentifier() or keyword.iskeyword(name) or name in _METAL_KEYWORDS:
                raise RuntimeError(
                    f"[metal_kernel] Unable to build metal library from source: "
                    f"{name!r} is not a valid parameter name"
                )
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RuntimeError(
                f"[metal_kernel] Unable to build metal library from source: parameter {twice[0]!r} "
                "is named twice"
            )


def _initial_output(shape: tuple, dtype, init_value) -> bytes:
    """An output's bytes before the kernel runs: `init_value` in its dtype, else all ones."""
    nbytes = int(np.prod(shape)) * dtype.size
    if init_value is None:
        return b"\xff" * nbytes
    return _raw(mx.full(shape, init_value, dtype=mx.float32).astype(dtype))


def _row_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return list(reversed(strides))


def metal_kernel(**kwargs) -> MetalKernelDouble:
    """Drop-in for mx.fast.metal_kernel (keyword arguments, as ops_metal calls it)."""
    return MetalKernelDouble(**kwargs)
