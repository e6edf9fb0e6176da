"""Before the first step, through the CLI: records without target tokens are skipped with a count
and their file:line (default) or refused (--strict-data)."""

import json

import pytest
from click.testing import CliRunner

from cli import main
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("early") / "model")


def _data(tmp_path):
    long_prompt = {"prompt": "fox " * 100, "completion": "dog"}
    rows = chat_records(6)
    rows[1:1] = [long_prompt]
    rows[4:4] = [long_prompt]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _finetune(model, data, out, *extra):
    return CliRunner().invoke(
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
            "1",
            "--batch-size",
            "2",
            "--max-seq-len",
            "64",
            "--backend",
            "torch",
            "--quiet",
            *extra,
        ],
    )


def test_records_without_targets_are_skipped_and_named(model, tmp_path):
    data = _data(tmp_path)
    r = _finetune(model, data, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (
        f"skipped 2 record(s) with no target tokens (a prompt of --max-seq-len 64 tokens or "
        f"more, or no text): {data}:2, {data}:5"
    ) in r.output


def test_strict_data_refuses_them_naming_the_first(model, tmp_path):
    data = _data(tmp_path)
    r = _finetune(model, data, tmp_path / "out", "--strict-data")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{data}:2: no target tokens" in r.output and "2 such record(s)" in r.output
    assert not (tmp_path / "out").exists()
