"""The library imports without its optional format packages: `gguf` is loaded only when a GGUF file
is read (the lent GPU image has none), and reading one without it fails with one line naming the
file and the missing package."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, pkgutil, sys
sys.modules["gguf"] = None  # any `import gguf` now raises ImportError
import nf4core, backends
for package in (nf4core, backends):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
sys.path.insert(0, "bench")
importlib.import_module("bench.gpu_check")  # its imports only; main() does not run
from nf4core import ModelLoadError, open_model
path = sys.argv[1]
open(path, "wb").write(b"GGUF" + bytes(64))
try:
    open_model(path)
except ModelLoadError as exc:
    print("ERROR:" + str(exc))
"""


def test_library_imports_and_reports_a_missing_gguf(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "m.gguf")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout.strip().splitlines()[-1]
    assert message.startswith("ERROR:") and "m.gguf" in message and "`gguf` package" in message
