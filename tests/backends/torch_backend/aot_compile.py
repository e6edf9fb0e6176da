"""Compile the kernels of cuda/ ahead of time for NVIDIA targets (no GPU needed: the triton wheel
ships ptxas and cuobjdump) in every launch configuration the dispatcher can choose, and print one
JSON line per compiled kernel: shared memory (Triton's allocation), registers and stack bytes per
thread (cuobjdump -res-usage on the cubin), whether the PTX or SASS has TF32 or FMA instructions.
Run in a process without TRITON_INTERPRET.

  python tests/backends/torch_backend/aot_compile.py [--all] [ARCH ...]  # default: 80 86 89 90 120
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from backends.torch_backend import launch_config, ops_triton  # noqa: E402

ARCHS = (80, 86, 89, 90, 120)
DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}
PTR = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "quant_map_ptr": "*fp32"}
# Rows that reach each branch of matmul_configs: the short tile and the tall one.
MATMUL_ROWS = (launch_config.GEMV_MAX_ROWS + 1, launch_config.SMALL_M + 1)


def jobs(archs: tuple[int, ...], everything: bool) -> list[dict]:
    """The (kernel, arch, dtype, constants, options) the launchers can compile, once each.

    everything=False (CI): per architecture the absmax kernel as launched, every GEMV candidate,
    and every forward matmul candidate (the ones autotuning times and the fallback) of every row
    class, in float32 and bfloat16 (float16 has bfloat16's shared memory); plus controls that show
    the checks can fail. everything=True adds float16, the input-gradient matmul (W not
    transposed) and dequantize."""
    out = []
    for arch in archs:
        cap = divmod(arch, 10)
        out.append(dict(kernel="absmax", arch=arch, dtype="fp32", fusion=False))
        for dt, size in DTYPES.items():
            if dt == "fp16" and not everything:
                continue
            if everything:
                out.append(dict(kernel="dequant", arch=arch, dtype=dt))
            for gemv in launch_config.gemv_configs(cap):
                out.append(
                    dict(
                        kernel="gemv",
                        arch=arch,
                        dtype=dt,
                        tiles=gemv.tiles(),
                        launch=gemv.options(),
                    )
                )
            configs = [launch_config.matmul_configs(cap, size, m) for m in MATMUL_ROWS]
            chosen = {c for options in configs for c in options}
            for config in sorted(chosen, key=str):
                for transposed in (True, False) if everything else (True,):
                    out.append(
                        dict(
                            kernel="matmul",
                            arch=arch,
                            dtype=dt,
                            transposed=transposed,
                            tiles=config.tiles(),
                            launch=config.options(),
                        )
                    )
    # Controls: fusion on contracts absmax into an FMA; an FP32 dot at "tf32" precision has TF32
    # instructions; the FP32 tile of before (64 x 64 x 64, 3 stages) overflows sm_86's 99 KB.
    out.append(dict(kernel="absmax", arch=80, dtype="fp32", fusion=True, control=True))
    out.append(
        dict(
            kernel="matmul",
            arch=80,
            dtype="fp32",
            transposed=True,
            precision="tf32",
            tiles={"BM": 16, "BN": 64, "BR": 32},
            launch={"num_stages": 2},
            control=True,
        )
    )
    out.append(
        dict(
            kernel="matmul",
            arch=86,
            dtype="fp32",
            transposed=True,
            control=True,
            tiles={"BM": 64, "BN": 64, "BR": 64},
            launch={"num_stages": 3},
        )
    )
    return out


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {k.lower(): int(v) for k, v in found.items()}, sass


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from backends.torch_backend.kernels import load_kernel_module

    k = load_kernel_module("nf4_kernels.py")
    dt, kind = job["dtype"], job["kernel"]
    options = dict(job.get("launch", {}))
    if kind == "absmax":
        fn = k.nf4_absmax_kernel
        sig = {
            "codes_ptr": "*u8",
            "scales_ptr": "*fp32",
            "nested_map_ptr": "*fp32",
            "offset": "fp32",
            "out_ptr": "*fp32",
            "n_blocks": "i32",
        }
        const = {"NESTED_BLOCKSIZE": 256, "BLOCK": ops_triton._ELEMENTS_PER_PROGRAM}
        fusion = {"enable_fp_fusion": True} if job["fusion"] else ops_triton.ABSMAX_COMPILE_OPTIONS
        options.update(fusion)
    elif kind == "dequant":
        fn = k.nf4_dequant_kernel
        sig = {**PTR, "out_ptr": f"*{dt}", "numel": "i64"}
        const = {"BLOCKSIZE": 64, "BLOCK": ops_triton._ELEMENTS_PER_PROGRAM}
    elif kind == "gemv":
        fn = k.nf4_gemv_kernel
        sig = {
            "x_ptr": f"*{dt}",
            **PTR,
            "y_ptr": f"*{dt}",
            "N": "i32",
            "K": "i32",
            "stride_xm": "i32",
            "stride_ym": "i32",
        }
        const = {"BLOCKSIZE": 64, "WHILE_LOOP": False, **job["tiles"]}
    else:
        fn = k.nf4_matmul_kernel
        sig = {
            "a_ptr": f"*{dt}",
            **PTR,
            "c_ptr": f"*{dt}",
            "M": "i32",
            "N": "i32",
            "R": "i32",
            "stride_am": "i32",
            "stride_ar": "i32",
            "stride_cm": "i32",
            "stride_cn": "i32",
            "w_cols": "i32",
        }
        const = {
            "BLOCKSIZE": 64,
            "W_TRANSPOSED": job["transposed"],
            "DOT_FP32": False,
            "PRECISION": job.get("precision", "ieee" if dt == "fp32" else "tf32"),
            "WHILE_LOOP": False,
            **job["tiles"],
        }
    signature = {**sig, **{n: "constexpr" for n in const}}
    source = ASTSource(fn=fn, signature=signature, constexprs=const)
    compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=options)
    ptx = compiled.asm["ptx"]
    usage, sass = _resources(compiled.asm["cubin"])
    return {
        **job,
        "shared": compiled.metadata.shared,
        **usage,
        "ptx_tf32": "tf32" in ptx.lower(),
        "sass_tf32": "tf32" in sass.lower(),
        "ptx_fma": re.search(r"\bfma\.", ptx) is not None,
    }


def main() -> None:
    everything = "--all" in sys.argv
    archs = tuple(int(a) for a in sys.argv[1:] if a != "--all") or ARCHS
    todo = jobs(archs, everything)
    workers = max(1, min(len(todo), int(os.environ.get("AOT_WORKERS", os.cpu_count() or 1))))
    with ProcessPoolExecutor(workers) as pool:
        for result in pool.map(compile_job, todo):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
