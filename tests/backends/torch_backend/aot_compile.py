"""Compile every kernel of cuda/ ahead of time for an NVIDIA target (no GPU needed: Triton ships
ptxas) and print what the tests check, as JSON. Run in a process without TRITON_INTERPRET.

  python tests/backends/torch_backend/aot_compile.py [ARCH]   # ARCH: 90 (H100/H200) by default
"""

import json
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from backends.torch_backend import ops_triton  # noqa: E402
from backends.torch_backend.kernels import load_kernel_module  # noqa: E402

PTR = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "quant_map_ptr": "*fp32"}


def compile_ptx(fn, signature: dict, constexprs: dict, options: dict, arch: int) -> str:
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def main() -> None:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    k = load_kernel_module("nf4_kernels.py")
    absmax_sig = {"codes_ptr": "*u8", "scales_ptr": "*fp32", "nested_map_ptr": "*fp32",
                  "offset": "fp32", "out_ptr": "*fp32", "n_blocks": "i32"}  # fmt: skip
    absmax_const = {"NESTED_BLOCKSIZE": 256, "BLOCK": 1024}
    out = {
        "absmax_fma_as_launched": "fma" in compile_ptx(
            k.nf4_absmax_kernel, absmax_sig, absmax_const, ops_triton.ABSMAX_COMPILE_OPTIONS, arch),
        "absmax_fma_with_fusion": "fma" in compile_ptx(
            k.nf4_absmax_kernel, absmax_sig, absmax_const, {"enable_fp_fusion": True}, arch),
        "compiled": [],
    }  # fmt: skip
    for dt in ("fp32", "bf16", "fp16"):
        compile_ptx(k.nf4_dequant_kernel, {**PTR, "out_ptr": f"*{dt}", "numel": "i64"},
                    {"BLOCKSIZE": 64, "BLOCK": 1024}, {}, arch)  # fmt: skip
        mm_sig = {"a_ptr": f"*{dt}", **PTR, "c_ptr": f"*{dt}", "M": "i32", "N": "i32", "R": "i32",
                  "stride_am": "i32", "stride_ar": "i32", "stride_cm": "i32", "stride_cn": "i32",
                  "w_cols": "i32"}  # fmt: skip
        for transposed in (True, False):
            compile_ptx(k.nf4_matmul_kernel, mm_sig, {
                "BLOCKSIZE": 64, "W_TRANSPOSED": transposed, "DOT_FP32": False,
                "PRECISION": "ieee" if dt == "fp32" else "tf32", "BM": 64, "BN": 64, "BR": 64}, {},
                arch)  # fmt: skip
        gemv_sig = {"x_ptr": f"*{dt}", **PTR, "y_ptr": f"*{dt}", "N": "i32", "K": "i32",
                    "stride_xm": "i32", "stride_ym": "i32"}  # fmt: skip
        compile_ptx(k.nf4_gemv_kernel, gemv_sig, {"BLOCKSIZE": 64, "BN": 32, "BK": 256}, {}, arch)
        out["compiled"].append(dt)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
