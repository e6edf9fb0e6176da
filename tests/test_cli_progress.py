"""Progress on stderr: every long phase (loading, validation, exact match, saving) prints a line;
when stderr is not a terminal (a log file), plain lines at a modest rate and never a `\\r`."""

from __future__ import annotations

import io
import time

import pytest

from backends.run_log import PhaseDisplay, Progress
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir, write_jsonl
from tests.backends.run_helpers import run_cli

pytest.importorskip("torch")


def test_finetune_and_eval_print_plain_phase_lines_into_a_log(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_records(8, seed=0))
    write_jsonl(data / "valid.jsonl", chat_records(4, seed=1))
    out = tmp_path / "out"
    r = run_cli(
        *("finetune", "--model", model, "--data", data, "--out", out, "--backend", "torch"),
        *("--batch-size", "4", "--max-seq-len", "64", "--steps", "3", "--eval-every", "2"),
    )
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = r.stderr.splitlines()
    for label in (
        "validation loss at step 2 (4 examples)",
        "validation loss at step 3 (4 examples)",
        "saving step 3 (checkpoint, adapter)",
    ):
        assert f"{label} ..." in lines
        assert any(x.startswith(f"{label}: done in ") for x in lines), label
    steps = [x.split(" [")[0] for x in lines if x.startswith("step ")]
    assert steps == ["step 1/3", "step 3/3"]  # the first and the last: at most one per 10 s between
    r = run_cli(
        "eval", data / "valid.jsonl", "--model", model, "--adapter", out, "--max-seq-len", "64"
    )
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = r.stderr.splitlines()
    assert "loss on 4 examples ..." in lines and "exact match on 4 examples ..." in lines
    assert r.stdout.startswith("loss ")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_rewritten_line_a_log_gets_lines():
    tty, log = _Terminal(), io.StringIO()
    for stream in (tty, log):
        bar = Progress(50, stream=stream, every=3600)
        for step in range(1, 51):
            bar.update(step, 1.0, 10)
        bar.close()
        display = PhaseDisplay(stream=stream, every=3600)
        with display.phase("validation loss", total=9) as c:
            for k in range(1, 10):
                c.update(k)
    assert tty.getvalue().count("\rstep ") == 50 and "\rvalidation loss: 9/9" in tty.getvalue()
    assert "\r" not in log.getvalue()
    assert [x.split(" [")[0] for x in log.getvalue().splitlines() if x.startswith("step ")] == [
        "step 1/50",
        "step 50/50",
    ]
    assert log.getvalue().splitlines()[-2:][0] == "validation loss ..."
    stopped = io.StringIO()
    bar = Progress(50, stream=stopped, every=3600)
    for step in range(1, 8):  # e.g. early stopping at step 7
        bar.update(step, 1.0, 10)
    bar.close()
    assert [x.split(" [")[0] for x in stopped.getvalue().splitlines()] == ["step 1/50", "step 7/50"]


def test_a_phase_reading_input_is_announced_in_a_log_only_once_it_lasts():
    log, tty = io.StringIO(), _Terminal()
    for stream in (log, tty):
        with pytest.raises(ValueError), PhaseDisplay(stream=stream).phase("load", log_delay=60):
            raise ValueError("bad input")
    assert log.getvalue() == ""  # the error stays the only line
    assert tty.getvalue().startswith("\rload ...") and tty.getvalue().endswith("\n")
    with PhaseDisplay(stream=log).phase("load", log_delay=0.05):
        time.sleep(0.5)
    assert log.getvalue().splitlines()[0] == "load ..."
    assert log.getvalue().splitlines()[1].startswith("load: done in ")
