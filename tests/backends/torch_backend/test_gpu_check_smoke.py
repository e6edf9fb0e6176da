"""bench/gpu_check.py runs end to end in its --smoke mode (CPU, Triton interpreter, tiny shapes)
as on the lent GPU image: without the `gguf` package (hidden here). So the script run on a GPU does
not rot between GPU sessions. With NF4_QLORA_TRITON36_PYTHON set to a Python whose environment has
that image's Triton 3.6 (see README), the smoke run is repeated under Triton 3.6's interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[3]
HIDE_GGUF = (
    "import runpy, sys; sys.modules['gguf'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _pythons() -> list:
    other = os.environ.get("NF4_QLORA_TRITON36_PYTHON")
    skip = pytest.mark.skip(reason="set NF4_QLORA_TRITON36_PYTHON to a Python with Triton 3.6")
    return [
        pytest.param(sys.executable, id="ci-triton"),
        pytest.param(other, id="triton-3.6", marks=() if other else skip),
    ]


@pytest.mark.parametrize("python", _pythons())
def test_gpu_check_smoke_without_gguf(tmp_path, python):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [python, "-c", HIDE_GGUF, str(REPO / "bench" / "gpu_check.py"), "--smoke", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = results["sections"]
    assert len(sections) == 8 and (tmp_path / "gpu_check.md").is_file()
    assert sections["device and launch configurations"]["ok"]
    dequant = sections["correctness: dequantize"]
    assert dequant["ok"] and dequant["cases"] == 48
    assert sections["correctness: matmuls"]["ok"]
    assert sections["bench: training step"][0]["tokens_per_s"] > 0
    tuned = sections["autotune: choices and timings"]
    assert tuned["enabled"] is False and tuned["timings_ms"] == {}  # on by default on CUDA only
