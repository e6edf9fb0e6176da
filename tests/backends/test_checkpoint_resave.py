"""Re-saving a step is crash-safe at every point, leftovers are cleaned at the next save, a missing
latest.json falls back to the newest complete checkpoint, and a non-finite state is never saved."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from backends import checkpoint as ckpt_mod
from backends.checkpoint import NonFiniteStateError, load_checkpoint, save_checkpoint
from backends.engine import TrainingState
from backends.finetune_config import FinetuneConfig
from cli import main
from tests.backends.finetune_fixtures import tiny_setup


def _state(step: int, value: float = 0.5) -> TrainingState:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    moments = {
        f"{key}.exp_avg": np.zeros((2, 3), np.float32),
        f"{key}.exp_avg_sq": np.ones((2, 3), np.float32),
    }
    return TrainingState({key: np.full((2, 3), value, np.float32)}, moments, step)


def _save(root, step, value=0.5):
    return save_checkpoint(
        root,
        _state(step, value),
        FinetuneConfig(steps=step).to_dict(),
        {"micro_batches": step},
        "torch",
    )


def _value(root) -> float:
    return float(next(iter(load_checkpoint(root).state.adapters.values()))[0, 0])


def _names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_resave_switches_latest_then_deletes_the_old_copy(tmp_path):
    _save(tmp_path, 2, 0.5)
    path = _save(tmp_path, 2, 0.75)
    assert path.name == "step-000002.1" and _value(tmp_path) == 0.75
    assert _names(tmp_path) == ["latest.json", "step-000002.1"]
    assert _save(tmp_path, 2, 1.0).name == "step-000002.2"
    assert _names(tmp_path) == ["latest.json", "step-000002.2"] and _value(tmp_path) == 1.0


def test_a_crash_before_the_pointer_switch_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 2, 0.5)
    real = ckpt_mod.write_text_atomic

    def crash_on_pointer(path, text):
        if path.name == "latest.json":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(ckpt_mod, "write_text_atomic", crash_on_pointer)
    with pytest.raises(OSError):
        _save(tmp_path, 2, 0.75)
    assert _value(tmp_path) == 0.5  # latest.json still names the complete old copy
    monkeypatch.undo()
    _save(tmp_path, 3, 0.25)
    assert _value(tmp_path) == 0.25


def test_a_crash_while_deleting_the_old_copy_leaves_a_loadable_run_and_is_cleaned(
    tmp_path, monkeypatch
):
    _save(tmp_path, 2, 0.5)
    real = shutil.rmtree

    def crash(path, *a, **kw):
        if str(path).endswith(".deleted.tmp"):
            raise KeyboardInterrupt  # the process dies here
        real(path, *a, **kw)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 0.75)
    monkeypatch.undo()
    assert _value(tmp_path) == 0.75
    (tmp_path / ".step-000009.abc.tmp").mkdir()  # a half-written save of an earlier crash
    assert ".step-000002.deleted.tmp" in _names(tmp_path)
    _save(tmp_path, 3)
    assert _names(tmp_path) == ["latest.json", "step-000002.1", "step-000003"]


def test_without_latest_json_the_newest_complete_checkpoint_is_used(tmp_path):
    _save(tmp_path, 2, 0.5)
    _save(tmp_path, 2, 0.75)
    _save(tmp_path, 1, 0.25)
    (tmp_path / "step-000007").mkdir()  # incomplete: no trainer_state.json
    (tmp_path / "latest.json").unlink()
    assert load_checkpoint(tmp_path).path.name == "step-000002.1"


@pytest.mark.parametrize("where", ["adapters", "moments"])
def test_a_nonfinite_state_is_never_saved(tmp_path, where):
    _save(tmp_path, 1)
    state = _state(2)
    group = state.adapters if where == "adapters" else state.moments
    next(iter(group.values()))[1, 1] = np.inf
    with pytest.raises(NonFiniteStateError, match="^step 2: the .* holds NaN or infinite values"):
        save_checkpoint(tmp_path, state, {}, {}, "torch")
    assert _names(tmp_path) == ["latest.json", "step-000001"]


def test_resuming_a_finished_run_from_an_earlier_step_resaves_its_last_step(tmp_path):
    pytest.importorskip("torch")
    model, data = tiny_setup(tmp_path)
    out = tmp_path / "run"
    common = ["--batch-size", "4", "--max-seq-len", "64", "--quiet"]
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "4",
            "--save-every",
            "2",
            "--backend",
            "torch",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    first = load_checkpoint(out).state
    r = CliRunner().invoke(
        main, ["finetune", "--resume", str(out / "checkpoints/step-000002"), "--quiet"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "checkpoints/latest.json").read_text()) == {
        "checkpoint": "step-000004.1"
    }
    assert _names(out / "checkpoints") == ["latest.json", "step-000002", "step-000004.1"]
    again = load_checkpoint(out).state
    for key, value in first.adapters.items():  # the same steps again: the same numbers
        np.testing.assert_array_equal(again.adapters[key], value)
