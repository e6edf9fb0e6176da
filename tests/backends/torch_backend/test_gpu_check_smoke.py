"""bench/gpu_check.py runs end to end in its --smoke mode (CPU, Triton interpreter, tiny shapes), so
the script the lead runs on a GPU does not rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[3]


def test_gpu_check_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke",
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    sections = results["sections"]
    assert len(sections) == 6 and (tmp_path / "gpu_check.md").is_file()
    assert sections["correctness: dequantize"]["ok"] and sections["correctness: dequantize"]["cases"] == 48
    assert sections["correctness: matmuls"]["ok"]
    assert sections["bench: training step"][0]["tokens_per_s"] > 0
