"""`--early-stopping-patience N`: a run whose validation loss gets worse stops after N evaluations
without improvement, and the adapter it writes is the best checkpoint's (read back with peft's
format reader, safetensors), named in the output and in metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from backends.checkpoint import load_checkpoint
from backends.early_stopping import EarlyStopping
from cli import main
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir, write_jsonl

pytest.importorskip("torch")


def _data_dir(tmp):
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_records(12, seed=0))
    valid = chat_records(6, seed=1)
    for r in valid:  # answers unlike the training ones: fitting the training set makes these worse
        r["messages"][1]["content"] = " ".join(reversed(r["messages"][1]["content"].split()))
    write_jsonl(data / "valid.jsonl", valid)
    return data


def _finetune(model, data, out, *extra):
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--batch-size", "4", "--max-seq-len", "64", "--backend", "torch", "--quiet"]
    return CliRunner().invoke(main, [*args, *extra])


def test_stops_early_and_writes_the_best_checkpoints_adapter(tmp_path):
    model, data = tiny_model_dir(tmp_path / "model"), _data_dir(tmp_path)
    out = tmp_path / "out"
    r = _finetune(
        model,
        data,
        out,
        *("--steps", "40", "--lr", "0.05", "--eval-every", "1"),
        *("--early-stopping-patience", "2", "--schedule", "constant"),
    )
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["step"], x["eval_loss"]) for x in records if "eval_loss" in x]
    trained = [x["step"] for x in records if "loss" in x]
    assert trained[-1] < 40  # stopped early
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert [s for s, _ in evals[-2:]] == [trained[-1] - 1, trained[-1]]  # two without improvement
    assert all(loss >= best_loss for _, loss in evals[-2:])
    (event,) = [x for x in records if x.get("event") == "best_checkpoint"]
    assert (event["best_step"], event["best_eval_loss"]) == (best_step, best_loss)
    assert f"early stopping at step {trained[-1]}" in r.output
    assert f"adapter: the best step's, {best_step}" in r.output
    best = load_checkpoint(event["checkpoint"])
    assert best.state.step == best_step
    assert load_checkpoint(out).state.step == trained[-1]  # resume continues the stopped run
    written = load_file(str(out / "adapter_model.safetensors"))
    assert set(written) == set(best.state.adapters)
    for key, value in best.state.adapters.items():
        np.testing.assert_array_equal(written[key].astype(np.float32), value)
    last = load_checkpoint(out).state.adapters
    assert any(not np.array_equal(last[k], v) for k, v in best.state.adapters.items())


def test_a_resumed_run_remembers_the_best_before_the_resume(tmp_path):
    model, data = tiny_model_dir(tmp_path / "model"), _data_dir(tmp_path)
    flags = ("--lr", "0.05", "--eval-every", "1", "--early-stopping-patience", "2")
    flags += ("--schedule", "constant")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _finetune(model, data, whole, "--steps", "40", *flags).exit_code == 0
    stopped = max(x["step"] for x in _metrics(whole) if "loss" in x)
    (event,) = [x for x in _metrics(whole) if x.get("event") == "best_checkpoint"]
    assert event["best_step"] < stopped - 1  # so a part can end between the best and the stop
    first = _finetune(model, data, parts, "--steps", str(event["best_step"] + 1), *flags)
    assert first.exit_code == 0, first.output
    r = CliRunner().invoke(main, ["finetune", "--resume", str(parts), "--steps", "40", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"early stopping at step {stopped}" in r.output
    (resumed,) = [x for x in _metrics(parts) if x.get("event") == "best_checkpoint"][-1:]
    assert resumed["best_step"] == event["best_step"]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, parts))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_needs_validation_data_and_eval_every(tmp_path):
    model, data = tiny_model_dir(tmp_path / "model"), _data_dir(tmp_path)
    r = _finetune(model, data / "train.jsonl", tmp_path / "a", "--early-stopping-patience", "2")
    assert r.exit_code != 0 and "early_stopping_patience 2: needs a validation set" in r.output
    r = _finetune(model, data, tmp_path / "b", "--early-stopping-patience", "2")
    assert r.exit_code != 0 and "early_stopping_patience 2: needs --eval-every N" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_patience_counts_evaluations_since_the_best():
    s = EarlyStopping(2)
    assert s.improved(1, 3.0) and not s.improved(2, 3.0) and not s.stop
    assert s.improved(3, 2.0) and not s.stop
    assert not s.improved(4, 2.5) and not s.improved(5, 2.1) and s.stop
    assert (s.best_step, s.best_loss) == (3, 2.0)
