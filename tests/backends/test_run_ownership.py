"""Output ownership end to end: a run writes only where the command line says, one run at a time,
never into another run unless told, and a failed run changes nothing it did not create."""

import json
import shutil
import signal
import subprocess
import time

import pytest

from backends.checkpoint import load_checkpoint
from backends.finetune import finetune
from backends.finetune_config import FinetuneConfig
from backends.resume import CHANGEABLE, FIXED, FROM_COMMAND_LINE_ONLY
from backends.run_dir import LOCK_NAME, run_lock
from tests.backends.finetune_fixtures import tiny_setup
from tests.backends.run_helpers import (
    ROOT,
    cli_command,
    cli_env,
    error_line,
    run_cli,
    snapshot,
    tiny_run_args,
)

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="module")
def finished_run(setup, tmp_path_factory):
    """A 4-step torch run with checkpoints at steps 2 and 4."""
    model, data = setup
    out = tmp_path_factory.mktemp("finished") / "run"
    finetune(
        FinetuneConfig(
            model=str(model),
            data=str(data),
            out=str(out),
            steps=4,
            batch_size=4,
            max_seq_len=64,
            save_every=2,
            backend="torch",
        ),
        echo=lambda s: None,
        progress=False,
    )
    return out


def copy_of(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name)


def test_every_setting_is_classified_for_resume():
    named = FIXED + CHANGEABLE + FROM_COMMAND_LINE_ONLY
    assert sorted(named) == sorted(f for f in FinetuneConfig.__dataclass_fields__)
    assert len(set(named)) == len(named)


def test_resume_writes_only_to_the_resumed_copy_or_to_out(finished_run, tmp_path):
    original = copy_of(finished_run, tmp_path, "original")
    before = snapshot(original)
    copied = copy_of(original, tmp_path, "copied")
    r = run_cli("finetune", "--resume", copied, "--steps", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(copied).state.step == 5
    r = run_cli(
        "finetune",
        "--resume",
        original / "checkpoints/step-000002",
        "--out",
        tmp_path / "elsewhere",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "elsewhere").state.step == 4
    assert (tmp_path / "elsewhere/adapter_model.safetensors").is_file()
    assert snapshot(original) == before  # byte for byte, and no file added or removed


def test_resume_refuses_flags_that_contradict_the_checkpoint(setup, finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    r = run_cli(
        "finetune",
        "--resume",
        run,
        "--lora-r",
        "4",
        "--seed",
        "3",
        "--targets",
        "q_proj",
        "--model",
        setup[0],
        "--steps",
        "6",
    )
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert f"{run}: cannot change on resume" in line
    assert "--lora-r 4 (checkpoint: 8)" in line and "--seed 3 (checkpoint: 0)" in line
    assert "--targets q_proj (checkpoint: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj," in line
    assert "--model" not in line and "--steps" not in line  # the same model; steps may change
    assert snapshot(run) == before


def test_resume_applies_and_reports_changeable_flags(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    lines = []
    r = finetune(
        FinetuneConfig(resume=str(run), steps=6, save_every=1), echo=lines.append, progress=False
    )
    assert "resume: applying --steps 6 (was 4), --save-every 1 (was 2)" in lines
    assert r.steps == 6 and len(r.losses) == 2
    assert (run / "checkpoints/step-000005").is_dir() and r.out == run


def test_a_fresh_run_refuses_a_non_empty_out_and_overwrite_moves_it_aside(
    setup, finished_run, tmp_path
):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    r = run_cli(*tiny_run_args(*setup, run, "--steps", "1"))
    assert r.returncode == 1 and "the output directory is not empty" in error_line(r.stderr)
    assert snapshot(run) == before
    r = run_cli(*tiny_run_args(*setup, run, "--steps", "1", "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert f"moved the earlier contents of {run} to {run}.old-1" in r.stdout
    assert snapshot(tmp_path / "run.old-1") == before  # moved, not deleted or changed
    assert load_checkpoint(run).state.step == 1


@pytest.mark.parametrize("problem", ["strict data", "missing model", "contradiction"])
def test_a_failed_run_changes_nothing(setup, finished_run, tmp_path, problem):
    model, data = setup
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    fresh = tmp_path / "fresh"
    if problem == "strict data":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(
            json.dumps({"prompt": "fox " * 200, "completion": "dog"}) + "\n" + data.read_text()
        )
        args = tiny_run_args(model, bad, fresh, "--strict-data", "--backend", "torch")
    elif problem == "missing model":
        args = tiny_run_args(tmp_path / "nowhere", data, fresh, "--backend", "torch")
    else:
        args = ["finetune", "--resume", str(run), "--max-seq-len", "32"]
    r = run_cli(*args)
    assert r.returncode == 1
    error_line(r.stderr)
    assert not fresh.exists()
    assert snapshot(run) == before


def test_a_stale_lock_is_taken_over_with_a_note(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": "here"}))
    lines = []
    finetune(FinetuneConfig(resume=str(run), steps=5), echo=lines.append, progress=False)
    assert any(
        f"was left by PID {gone.pid} on here, which no longer holds it; taking it over" in x
        for x in lines
    ), lines
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_a_held_lock_refuses_a_second_writer(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    with run_lock(run, echo=lambda s: None):
        r = run_cli("finetune", "--resume", run, "--steps", "5")
    assert r.returncode == 1
    assert "another run is writing here (PID" in error_line(r.stderr)
    assert load_checkpoint(run).state.step == 4


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_concurrent_run_refused_then_sigint_saves_and_the_run_resumes(setup, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        cli_command(*tiny_run_args(*setup, out, "--steps", "100000", "--backend", "torch")),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, 90)
        second = run_cli(*tiny_run_args(*setup, out, "--steps", "3", "--overwrite"))
        assert second.returncode == 1
        assert f"another run is writing here (PID {first.pid} on" in error_line(second.stderr)
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert f"continue with: python cli.py finetune --resume {out}" in stderr
    saved = load_checkpoint(out)
    assert (out / "adapter_model.safetensors").is_file() and not (out / LOCK_NAME).exists()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert saved.state.step == logged[-1] >= 2
    r = run_cli("finetune", "--resume", out, "--steps", str(saved.state.step + 1), "--quiet")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out).state.step == saved.state.step + 1


def test_without_flock_the_holders_pid_decides(tmp_path, monkeypatch):
    import errno
    import os
    import socket

    from backends import run_dir

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_flock)
    host = socket.gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": host}))
    holder = f"another run is writing here \\(PID {os.getpid()}"
    with pytest.raises(run_dir.RunDirError, match=holder):
        with run_lock(tmp_path, echo=lambda s: None):
            pass
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": host}))
    notes = []
    with run_lock(tmp_path, echo=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert notes and f"PID {gone.pid}" in notes[0]
