"""Resume is exact on each backend, and a run started on one backend continues on the other: 5 steps
+ 5 resumed steps match 10 uninterrupted steps (bit for bit on one backend, within float32 rounding
across backends). Tiny model, CPU."""

from pathlib import Path

import numpy as np
import pytest

from backends.finetune import FinetuneConfig, finetune
from tests.backends.finetune_fixtures import tiny_setup

pytest.importorskip("mlx.core")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("resume"))


def run(setup, out: Path, backend: str, **kw):
    model, data = setup
    cfg = FinetuneConfig(
        model=str(model),
        data=str(data),
        out=str(out),
        steps=10,
        batch_size=4,
        max_seq_len=64,
        lr=1e-2,
        warmup_steps=2,
        backend=backend,
        save_every=5,
        **kw,
    )
    return finetune(cfg, echo=lambda s: None, progress=False)


def resume(ckpt: Path, out: Path, backend: str):
    cfg = FinetuneConfig(resume=str(ckpt), out=str(out), backend=backend)
    return finetune(cfg, echo=lambda s: None, progress=False)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """10 steps on each backend (checkpoint at step 5)."""
    root = tmp_path_factory.mktemp("ref")
    return {
        b: (run(setup, root / b, b).losses, root / b / "checkpoints" / "step-000005")
        for b in ("torch", "mlx")
    }


def test_backends_agree_over_ten_steps(reference):
    np.testing.assert_allclose(reference["mlx"][0], reference["torch"][0], rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_resume_on_the_same_backend_is_exact(reference, backend, tmp_path):
    losses, ckpt = reference[backend]
    resumed = resume(ckpt, tmp_path / "out", backend)
    assert resumed.steps == 10 and len(resumed.losses) == 5
    if backend == "torch":
        assert resumed.losses == losses[5:]
    else:  # MLX's compiled graphs may fuse differently after a restart: float32 rounding at most
        np.testing.assert_allclose(resumed.losses, losses[5:], rtol=1e-6)


@pytest.mark.parametrize("start,finish", [("torch", "mlx"), ("mlx", "torch")])
def test_resume_on_the_other_backend(reference, start, finish, tmp_path):
    losses, ckpt = reference[start]
    resumed = resume(ckpt, tmp_path / "out", finish)
    assert resumed.choice.backend == finish
    np.testing.assert_allclose(resumed.losses, losses[5:], rtol=1e-4)
    np.testing.assert_allclose(resumed.losses, reference[finish][0][5:], rtol=1e-4)
