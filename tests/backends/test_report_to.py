"""`--report-to tensorboard|wandb` through the CLI: what the run logs is read back with TensorBoard's
own event reader (and wandb's offline run store); a missing package is one line naming it."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir, write_jsonl

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_records(8, seed=0))
    write_jsonl(data / "valid.jsonl", chat_records(4, seed=1))
    return tiny_model_dir(tmp / "model"), data


def _finetune(setup, out, *extra):
    model, data = setup
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--batch-size", "4", "--max-seq-len", "64", "--steps", "3", "--eval-every", "2"]
    return CliRunner().invoke(main, [*args, "--backend", "torch", "--quiet", *extra])


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_metrics(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    r = _finetune(setup, out, "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= tags
    train = [x for x in _metrics(out) if "loss" in x]
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [x["step"] for x in train] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([x[key] for x in train], rel=1e-6)
    evals = [x for x in _metrics(out) if "eval_loss" in x]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("eval/loss")] == [
        (x["step"], x["eval_loss"]) for x in evals
    ]
    assert [x["step"] for x in evals] == [2, 3]


def test_missing_package_is_one_line_naming_it(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises
    r = _finetune(setup, tmp_path / "out", "--report-to", "tensorboard")
    assert r.exit_code == 1
    (line,) = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert "report_to tensorboard: the tensorboard package is not installed" in line
    assert "(pip install tensorboard)" in line
    assert not (tmp_path / "out").exists()


def test_wandb_offline_run_holds_the_metrics(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    r = _finetune(setup, out, "--report-to", "wandb")
    assert r.exit_code == 0, r.output
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {}
    for data in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            for key, value in items.items():
                if "/" in key:
                    logged.setdefault(key, []).append((items["_step"], value))
    train = [x for x in _metrics(out) if "loss" in x]
    assert logged["train/loss"] == [(x["step"], pytest.approx(x["loss"])) for x in train]
    assert [s for s, _ in logged["eval/loss"]] == [2, 3]


def _wandb_records(path: Path):
    """The protobuf records of a `.wandb` run file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log records (crc32, uint16 length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks, a block's tail shorter than a record header left as padding."""
    blob, block = path.read_bytes(), 32768
    assert blob[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(blob):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", blob[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        pending += blob[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""
