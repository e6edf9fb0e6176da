"""Without a GPU: the kernels compile, in the launch configurations the dispatcher chooses, for
sm_80 (A100), sm_86 (RTX 30xx), sm_89 (RTX 40xx, L4), sm_90 (H100/H200) and sm_120 (RTX 50xx) with
Triton's own ptxas, and each fits its architecture: shared memory within the per-block limit,
registers and per-thread stack within budget, no TF32 instruction in an FP32 matmul, no fused
multiply-add in the double-quant absmax kernel. Controls show each check can fail.

The whole matrix (float16, input-gradient matmuls, fallback tiles, dequantize: ~130 compiles) runs
with NF4_QLORA_AOT_ALL=1; by default a ~40-compile subset keeps this under about a minute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from backends.torch_backend import launch_config  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip("this triton build ships no NVIDIA ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # today's default, explicit (silences a warning)
    args = ["--all"] if os.environ.get("NF4_QLORA_AOT_ALL") == "1" else []
    proc = subprocess.run(
        [sys.executable, str(HERE / "aot_compile.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _launched(compiled):
    return [r for r in compiled if not r.get("control")]


def _name(r: dict) -> str:
    return (
        f"sm_{r['arch']} {r['kernel']} {r['dtype']} {r.get('tiles', '')} "
        f"{r.get('launch', '')} transposed={r.get('transposed')}"
    )


def test_every_architecture_and_kernel_compiled(compiled):
    launched = _launched(compiled)
    assert {r["arch"] for r in launched} == {80, 86, 89, 90, 120}
    for arch in (80, 86, 89, 90, 120):
        kinds = {(r["kernel"], r["dtype"]) for r in launched if r["arch"] == arch}
        assert {
            ("absmax", "fp32"),
            ("gemv", "bf16"),
            ("matmul", "fp32"),
            ("matmul", "bf16"),
        } <= kinds


def test_shared_memory_fits_each_architecture(compiled):
    for r in _launched(compiled):
        limit = launch_config.SHARED_MEMORY_PER_BLOCK[divmod(r["arch"], 10)]
        assert r["shared"] <= limit, f"{_name(r)}: {r['shared']} bytes > {limit}"
    control = next(r for r in compiled if r.get("control") and r["arch"] == 86)
    assert control["shared"] > launch_config.SHARED_MEMORY_PER_BLOCK[(8, 6)], control


def test_registers_and_spills_within_budget(compiled):
    for r in _launched(compiled):
        assert r["reg"] <= launch_config.REGISTER_BUDGET, _name(r)
        assert r["stack"] <= launch_config.SPILL_BUDGET_BYTES, f"{_name(r)}: stack {r['stack']}"


def test_fp32_matmuls_use_no_tf32(compiled):
    fp32 = [r for r in _launched(compiled) if r["kernel"] == "matmul" and r["dtype"] == "fp32"]
    assert fp32
    for r in fp32:
        assert not r["ptx_tf32"] and not r["sass_tf32"], _name(r)
    control = next(r for r in compiled if r.get("control") and r.get("precision") == "tf32")
    assert control["ptx_tf32"] and control["sass_tf32"], "control: a tf32 dot must show TF32"


def test_absmax_has_no_fma(compiled):
    absmax = [r for r in _launched(compiled) if r["kernel"] == "absmax"]
    assert len(absmax) == 5
    for r in absmax:
        assert not r["ptx_fma"], _name(r)
    control = next(r for r in compiled if r.get("control") and r["kernel"] == "absmax")
    assert control["ptx_fma"], "control: fusion on should contract into an fma"
