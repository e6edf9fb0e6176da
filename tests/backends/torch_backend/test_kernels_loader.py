"""The kernel sources are found by path (in the checkout and after a non-editable install), `cuda/`
is not a package, and every kernel file carries its header."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backends.torch_backend import kernels

REPO = Path(__file__).resolve().parents[3]


def test_checkout_kernels_are_found():
    assert kernels.kernel_dir() == REPO / "cuda"
    for name in kernels.KERNEL_FILES:
        assert (kernels.kernel_dir() / name).is_file()


def test_cuda_is_not_a_python_package():
    assert not (REPO / "cuda" / "__init__.py").exists()


def test_every_kernel_file_has_its_header():
    for path in (REPO / "cuda").glob("*.py"):
        head = path.read_text().split('"""')[1]
        for word in ("Computes", "Layout", "Test"):
            assert word in head, (path.name, word)


def test_every_cpu_kernel_file_has_its_header():
    sources = sorted((REPO / "cpu").glob("*.c*"))
    assert {p.name for p in sources} >= {"nf4_gemv.cpp", "nf4_dequant.c"}
    for path in sources:
        head = path.read_text().split("#include")[0]
        for words in ("What it computes", "Layout assumptions", "How to test it"):
            assert words in head, (path.name, words)


def test_override_and_missing_dir(tmp_path, monkeypatch):
    (tmp_path / "nf4_kernels.py").write_text("")
    monkeypatch.setenv("NF4_QLORA_KERNEL_DIR", str(tmp_path))
    assert kernels.kernel_dir() == tmp_path
    monkeypatch.setattr(kernels, "candidate_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        kernels.kernel_dir()
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.load_kernel_module("evil.py")


def test_backend_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import backends.torch_backend.ops as ops, backends.torch_backend.ops_triton\n"
        "import backends.torch_backend.train_step, backends.torch_backend.generate\n"
        "import torch; from backends.torch_backend import dispatch\n"
        "assert not dispatch.triton_available()\n"
        "assert not dispatch.use_triton(torch.zeros(1))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_non_editable_install_ships_and_finds_the_kernels(tmp_path):
    """Build the wheel, install it under a fresh prefix, import from there (not from the checkout)."""
    pytest.importorskip("setuptools")  # the build backend, used without network (no isolation)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip
        + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("data/share/nf4-qlora/cuda/nf4_kernels.py") for n in names), names
    for cpu_source in ("nf4_gemv.cpp", "nf4_dequant.c"):
        assert any(n.endswith(f"data/share/nf4-qlora/cpu/{cpu_source}") for n in names), names
    assert not any(n.startswith("cuda/") for n in names)  # no top-level `cuda` package
    prefix = tmp_path / "prefix"
    # --ignore-installed: never uninstall the developer's own (editable) install of the project
    subprocess.run(
        pip
        + [
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--prefix",
            str(prefix),
            str(wheel),
        ],
        check=True,
        cwd=tmp_path,
    )
    (site,) = prefix.glob("lib/python*/site-packages")
    code = (
        "import backends.torch_backend.kernels as k, pathlib, sys\n"
        "import backends.torch_backend.native_build as b\n"
        "assert 'site-packages' in k.__file__, k.__file__\n"
        "print(k.kernel_dir())\n"
        "print(b.source_path('nf4_gemv.cpp').parent, b.source_path('nf4_dequant.c').parent)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "NF4_QLORA_KERNEL_DIR": ""}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert Path(out[0]) == prefix / "share" / "nf4-qlora" / "cuda"
    assert Path(out[1]) == Path(out[2]) == prefix / "share" / "nf4-qlora" / "cpu"
