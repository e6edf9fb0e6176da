"""Numerical guards: a NaN/Inf step stops the run naming the step (latest.json stays on the last
good checkpoint, no NaN adapter), `--skip-nonfinite N` skips such updates on both backends, and eval
and merge refuse non-finite results."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from backends.checkpoint import load_checkpoint
from backends.finetune import finetune
from backends.finetune_config import FinetuneConfig
from backends.nonfinite import NonFiniteError
from cli import main
from tests.backends.finetune_fixtures import tiny_setup
from tests.backends.run_helpers import error_line, run_cli, tiny_run_args

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("nan"))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    setup, tmp_path, backend
):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    out = tmp_path / "run"
    r = run_cli(
        *tiny_run_args(
            *setup, out, "--steps", "8", "--save-every", "1", "--lr", "1e30", "--backend", backend
        )
    )
    assert r.returncode == 1
    line = error_line(r.stderr)
    bad_step = int(re.search(r"step (\d+): non-finite", line).group(1))
    latest = json.loads((out / "checkpoints/latest.json").read_text())["checkpoint"]
    assert latest == f"step-{bad_step - 1:06d}" and latest in line
    assert load_checkpoint(out).state.step == bad_step - 1  # loads: every value finite
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "checkpoints" / f"step-{bad_step:06d}").exists()


def _inject_nan_at(monkeypatch, backend: str, bad_call: int) -> None:
    """Make the loss (and so every gradient) of the `bad_call`-th training forward NaN."""
    calls = []
    if backend == "torch":
        from backends.torch_backend.model.llama import CausalLM

        real = CausalLM.loss  # the training step's loss (evaluation computes its own)

        def loss(self, *args, **kw):
            calls.append(1)
            summed, n = real(self, *args, **kw)
            return (summed * float("nan") if len(calls) == bad_call else summed), n

        monkeypatch.setattr(CausalLM, "loss", loss)
    else:
        from mlx.utils import tree_map

        from backends.mlx_backend.train_step import Trainer

        real = Trainer.gradients

        def gradients(self, micro_batches, *args):
            calls.append(1)
            grads, loss, tokens = real(self, micro_batches, *args)
            if len(calls) == bad_call:
                return tree_map(lambda g: g * float("nan"), grads), float("nan"), tokens
            return grads, loss, tokens

        monkeypatch.setattr(Trainer, "gradients", gradients)


def _cfg(setup, out, backend, **kw):
    model, data = setup
    base = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        steps=4,
        batch_size=4,
        max_seq_len=64,
        lr=1e-2,
        save_every=1,
        backend=backend,
    )
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_skip_nonfinite_skips_the_update_and_continues(setup, tmp_path, monkeypatch, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    _inject_nan_at(monkeypatch, backend, bad_call=2)
    lines = []
    r = finetune(
        _cfg(setup, tmp_path, backend, skip_nonfinite=1), echo=lines.append, progress=False
    )
    assert r.steps == 4 and len(r.losses) == 3 and all(np.isfinite(r.losses))
    assert any(
        x.startswith("step 2: non-finite loss nan") and "update skipped (1 of" in x for x in lines
    ), lines
    one, two = (load_checkpoint(tmp_path / f"checkpoints/step-00000{k}").state for k in (1, 2))
    for key in one.adapters:  # the skipped step changed nothing
        np.testing.assert_array_equal(one.adapters[key], two.adapters[key])
        np.testing.assert_array_equal(one.moments[f"{key}.exp_avg"], two.moments[f"{key}.exp_avg"])
    four = load_checkpoint(tmp_path).state
    assert four.step == 4 and any(
        not np.array_equal(one.adapters[k], four.adapters[k]) for k in one.adapters
    )
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if x.get("event") == "nonfinite"] == [2]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_without_skip_a_nonfinite_step_stops_before_saving_it(
    setup, tmp_path, monkeypatch, backend
):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    _inject_nan_at(monkeypatch, backend, bad_call=3)
    with pytest.raises(NonFiniteError, match="^step 3: non-finite loss nan.*step-000002"):
        finetune(_cfg(setup, tmp_path, backend), echo=lambda s: None, progress=False)
    assert load_checkpoint(tmp_path).state.step == 2


@pytest.fixture(scope="module")
def exploding_adapter(setup, tmp_path_factory):
    """A trained adapter whose matrices are finite but whose product overflows float32."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("adapter") / "run"
    finetune(_cfg(setup, out, "torch", steps=1, save_every=0), echo=lambda s: None, progress=False)
    path = out / "adapter_model.safetensors"
    save_file({k: np.full_like(v, 1e30) for k, v in load_file(str(path)).items()}, str(path))
    return out


def test_eval_refuses_a_nonfinite_loss(setup, exploding_adapter):
    model, data = setup
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(data),
            "--model",
            str(model),
            "--adapter",
            str(exploding_adapter),
            "--backend",
            "torch",
        ],
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{exploding_adapter}: the loss on {data} is nan (not finite)" in r.output


@pytest.mark.parametrize("how", [["--dtype", "float32"], ["--nf4"]])
def test_merge_refuses_nonfinite_weights(setup, exploding_adapter, tmp_path, how):
    r = CliRunner().invoke(
        main, ["merge", str(exploding_adapter), str(tmp_path / "m"), "--model", str(setup[0]), *how]
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert re.search(
        rf"{exploding_adapter}: merged into the base, model\.layers\.\d+\.\S+ would "
        "hold NaN or infinite values",
        r.output,
    ), r.output
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_run_with_a_skipped_step_resumes_exactly(setup, tmp_path, monkeypatch, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    _inject_nan_at(monkeypatch, backend, bad_call=1)  # the very first step: no optimizer state yet
    full = finetune(
        _cfg(setup, tmp_path / "full", backend, skip_nonfinite=1, save_every=2),
        echo=lambda s: None,
        progress=False,
    )
    monkeypatch.undo()
    resumed = finetune(
        FinetuneConfig(
            resume=str(tmp_path / "full/checkpoints/step-000002"), out=str(tmp_path / "resumed")
        ),
        echo=lambda s: None,
        progress=False,
    )
    np.testing.assert_allclose(resumed.losses, full.losses[-2:], rtol=1e-6)
    a, b = load_checkpoint(tmp_path / "full").state, load_checkpoint(tmp_path / "resumed").state
    for key in a.adapters:
        np.testing.assert_allclose(b.adapters[key], a.adapters[key], rtol=1e-5, atol=1e-7)


def test_a_resume_that_fails_changes_nothing_of_the_run_but_its_log(setup, tmp_path, monkeypatch):
    finetune(_cfg(setup, tmp_path, "torch", save_every=2), echo=lambda s: None, progress=False)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _inject_nan_at(monkeypatch, "torch", bad_call=1)
    with pytest.raises(NonFiniteError, match="^step 3: non-finite"):
        finetune(
            FinetuneConfig(resume=str(tmp_path / "checkpoints/step-000002")),
            echo=lambda s: None,
            progress=False,
        )
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    log = tmp_path / "metrics.jsonl"
    assert after.pop(log).startswith(before.pop(log))  # the failed step appended, nothing removed
    assert after == before  # config.yaml, checkpoints, latest.json and the adapter as they were
