"""Kernel dispatch, the Metal source loader (checkout, install prefix, wheel) and mlx-free import."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import nf4core

mx = pytest.importorskip("mlx.core")
from backends.mlx_backend import dispatch, ops_reference
from backends.mlx_backend.metal_sources import KERNELS, SHARE_SUBDIR, find_metal_dir
from backends.mlx_backend.nf4_weight import NF4Weight

REPO = Path(__file__).resolve().parents[3]
needs_metal = pytest.mark.skipif(not dispatch.metal_usable(), reason="needs a Metal GPU")


def test_reference_path_off_metal_and_forcing():
    if not dispatch.metal_usable():
        assert dispatch.selected_path() == "reference"
        with dispatch.force_path("metal"), pytest.raises(RuntimeError, match="were requested"):
            dispatch.selected_path()
    with dispatch.force_path("reference"):
        assert dispatch.selected_path() == "reference"
    with pytest.raises(ValueError), dispatch.force_path("cuda"):
        pass


def test_environment_variable_forces_a_path(monkeypatch):
    monkeypatch.setenv("NF4_KERNELS", "reference")
    assert dispatch.selected_path() == "reference"
    monkeypatch.setenv("NF4_KERNELS", "fastest")
    with pytest.raises(ValueError, match="NF4_KERNELS"):
        dispatch.selected_path()
    monkeypatch.delenv("NF4_KERNELS")
    monkeypatch.setenv("NF4_MLX_KERNELS", "reference")  # the deprecated name still counts
    assert dispatch.selected_path() == "reference"


def test_loader_finds_checkout_and_install_prefix(tmp_path):
    assert find_metal_dir() == REPO / "metal"
    assert not (REPO / "metal" / "__init__.py").exists()
    installed = tmp_path / SHARE_SUBDIR
    installed.mkdir(parents=True)
    for spec in KERNELS.values():
        (installed / spec.filename).write_text("// body")
    assert find_metal_dir([tmp_path / "missing", installed]) == installed
    with pytest.raises(FileNotFoundError, match="looked in"):
        find_metal_dir([tmp_path / "missing"])


def test_wheel_ships_the_metal_sources(tmp_path):
    """A non-editable install gets the .metal files as data under share/nf4-qlora/metal."""
    source = tmp_path / "src"  # build a copy: setuptools writes build/ and *.egg-info in place
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "runs"
        ),
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(source),
    ]
    subprocess.run(command, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for spec in KERNELS.values():
        assert any(
            n.endswith(f".data/data/{SHARE_SUBDIR.as_posix()}/{spec.filename}") for n in names
        )
    assert any(n.endswith("metal_shim.h") for n in names)
    assert not any(n.startswith("metal/") for n in names)  # no top-level `metal` package


def test_import_without_mlx():
    code = (
        "import sys; sys.modules['mlx'] = None; import backends, backends.mlx_backend as b; "
        "assert not b.is_available(); print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    code = (
        "import sys; sys.modules['mlx'] = None; import backends.mlx_backend as b\n"
        "try:\n    b.NF4Linear\nexcept ImportError as e:\n    print('msg:', e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert "pip install" in out.stdout, out.stdout + out.stderr


@needs_metal
@pytest.mark.metal
@pytest.mark.parametrize("double_quant", [False, True])
def test_metal_kernels_match_reference(double_quant):
    from backends.mlx_backend import ops_metal

    rng = np.random.default_rng(0)
    for shape, bs in (((37, 129), 64), ((96, 67), 32), ((256, 1024), 128)):
        t = nf4core.quantize(rng.standard_normal(shape).astype(np.float32), bs, double_quant)
        w = NF4Weight.from_nf4(t)
        np.testing.assert_array_equal(
            np.array(ops_metal.reconstruct_absmax(w)).view(np.uint32),
            t.block_absmax().view(np.uint32),
        )
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            got = ops_metal.dequantize(w, dtype).astype(mx.float32)
            want = ops_reference.dequantize(w, dtype).astype(mx.float32)
            np.testing.assert_array_equal(np.array(got), np.array(want))
        for m in (1, 5, 33):
            x = mx.array(rng.standard_normal((m, shape[1])).astype(np.float32))
            g = mx.array(rng.standard_normal((m, shape[0])).astype(np.float32))
            np.testing.assert_allclose(
                np.array(ops_metal.linear(x, w)),
                np.array(ops_reference.linear(x, w)),
                rtol=1e-4,
                atol=1e-4,
            )
            np.testing.assert_allclose(
                np.array(ops_metal.linear_grad_input(g, w)),
                np.array(ops_reference.linear_grad_input(g, w)),
                rtol=1e-4,
                atol=1e-4,
            )


def test_every_kernel_builds_from_its_file(monkeypatch):
    """mx.fast.metal_kernel accepts each body (it compiles on first call, on a Metal device only)."""
    from backends.mlx_backend import ops_metal

    for name in KERNELS:
        assert callable(ops_metal._kernel(name))
    with pytest.raises(ValueError, match="strategy"):
        ops_metal._strategy("tiled", 4)
    assert (
        ops_metal._strategy("auto", 8) == "fused" and ops_metal._strategy("auto", 65) == "dequant"
    )
    monkeypatch.setenv("NF4_MLX_FUSED_MAX_ROWS", "0")
    assert ops_metal._strategy("auto", 1) == "dequant"


def test_metal_check_script_skips_without_metal():
    if dispatch.metal_usable():
        pytest.skip("this machine has Metal: run bench/metal_check.py itself")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "metal_check.py")],
        capture_output=True,
        text=True,
        cwd=REPO / "bench",
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "SKIPPED" in out.stdout


@needs_metal
@pytest.mark.metal
def test_metal_training_steps_match_reference_path():
    """Three QLoRA steps with the kernels and with the reference ops: the same losses (fp32)."""
    from backends.engine import LoRASettings
    from backends.mlx_backend.lora import apply_lora
    from backends.mlx_backend.model import CausalLM
    from backends.mlx_backend.train_step import Batch, TrainConfig, Trainer

    from .tiny_models import random_tensors, tiny_config

    config = tiny_config("qwen2")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(4, 33))
    losses = {}
    for path in ("metal", "reference"):
        with dispatch.force_path(path):
            model = CausalLM.from_state(config, random_tensors(config), compute_dtype="float32")
            apply_lora(model, LoRASettings(r=4))
            trainer = Trainer(model, TrainConfig())
            losses[path] = [
                trainer.train_step([Batch.from_tokens(tokens)], 2e-4)["loss"] for _ in range(3)
            ]
    np.testing.assert_allclose(losses["metal"], losses["reference"], rtol=1e-4)
