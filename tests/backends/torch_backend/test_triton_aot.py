"""Without a GPU: every kernel compiles for an H100/H200 (sm_90) with Triton's own ptxas, and the
double-quant absmax kernel, launched with our options, has no fused multiply-add in its PTX (with
fusion on it would, which shows the check can fail)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


def test_kernels_compile_for_sm90_and_absmax_has_no_fma():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no NVIDIA ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # today's default, explicit (silences a warning)
    proc = subprocess.run([sys.executable, str(HERE / "aot_compile.py"), "90"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["compiled"] == ["fp32", "bf16", "fp16"]
    assert result["absmax_fma_with_fusion"], "control: fusion on should contract into an fma"
    assert not result["absmax_fma_as_launched"]
