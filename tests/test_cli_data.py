"""`finetune --data` in the shapes people have, through the CLI: the format found is printed once,
`--data-format` (or the config file's data_format) decides ambiguous records, and data that fails
validation stops the run before --out exists."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from tests.backends.finetune_fixtures import tiny_model_dir

pytest.importorskip("torch")

SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"repeat {w}"}, {"from": "gpt", "value": w}]}
    for w in ("fox", "dog", "lazy", "brown")
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


def finetune(model, data, out, *extra):
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--steps", "1", "--batch-size", "2", "--max-seq-len", "64", "--quiet", *extra]
    return CliRunner().invoke(main, args)


def data_lines(output: str) -> list[str]:
    return [x for x in output.splitlines() if x.startswith("data: ")]


def test_sharegpt_json_array_trains_and_the_format_is_printed_once(model, tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(SHAREGPT))
    r = finetune(model, path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert data_lines(r.output) == [f"data: {path}, 4 examples (format: sharegpt)"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    r = CliRunner().invoke(main, ["eval", str(path), "--model", str(model), "--max-seq-len", "64"])
    assert r.exit_code == 0, r.output
    assert "(4 examples)" in r.stdout.splitlines()[0] and "exact match" in r.stdout


def test_data_format_decides_an_ambiguous_file(model, tmp_path):
    rows = [
        {"instruction": f"repeat {w}", "input": "", "output": w, "text": f"repeat {w}: {w}"}
        for w in ("fox", "dog")
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = finetune(model, path, tmp_path / "auto")
    assert r.exit_code == 0, r.output
    assert data_lines(r.output) == [f"data: {path}, 2 examples (format: alpaca)"]
    r = finetune(model, path, tmp_path / "text", "--data-format", "text")
    assert r.exit_code == 0, r.output
    assert data_lines(r.output) == [f"data: {path}, 2 examples (format: text)"]
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"data-format": "text"}))
    r = finetune(model, path, tmp_path / "conf", "--config", str(conf))
    assert r.exit_code == 0, r.output
    assert data_lines(r.output) == [f"data: {path}, 2 examples (format: text)"]
    assert yaml.safe_load((tmp_path / "conf" / "config.yaml").read_text())["data_format"] == "text"
    r = CliRunner().invoke(main, ["finetune", "--model", str(model), "--data-format", "text"])
    assert r.exit_code == 1 and "data_format text: applies to --data, not the built-in" in r.output
    conf.write_text(yaml.safe_dump({"data_format": "csv"}))
    r = finetune(model, path, tmp_path / "bad-conf", "--config", str(conf))
    assert r.exit_code == 1 and "data_format must be one of" in r.output


def test_a_dataset_dict_saved_by_datasets_gives_train_and_validation(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": w}]}
        for w in ("a", "b", "c")
    ]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows),
            "validation": datasets.Dataset.from_list(rows[:1]),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    r = finetune(model, tmp_path / "saved", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert data_lines(r.output) == [
        f"data: {tmp_path / 'saved' / 'train'}, 3 examples; validation: "
        f"{tmp_path / 'saved' / 'validation'}, 1 examples (format: messages)"
    ]


TOOL_CALL = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
BAD = {
    "unknown-shape": ({"question": "q", "answer": "a"}, "d.jsonl:1: no known record shape"),
    "image-part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        "d.jsonl:1: messages[0].content[0]: a content part of type 'image_url' (only text parts)",
    ),
    "unrendered-tool-call": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            ]
        },
        "d.jsonl:1: the chat template does not render tool calls (messages[1].tool_calls)",
    ),
    "preference": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "d.jsonl:1: a preference record",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_failed_validation_leaves_no_out(model, tmp_path, case):
    record, message = BAD[case]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    r = finetune(model, data, out)
    assert r.exit_code == 1
    errors = [x for x in r.output.splitlines() if x.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert not out.exists()


def test_an_unknown_split_file_or_dataset_id_leaves_no_out(model, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "train.jsonl").write_text(json.dumps(SHAREGPT[0]) + "\n")
    (tmp_path / "dir" / "notes.jsonl").write_text(json.dumps(SHAREGPT[0]) + "\n")
    r = finetune(model, tmp_path / "dir", tmp_path / "out")
    assert r.exit_code == 1 and "notes.jsonl: cannot tell which split" in r.output
    r = finetune(model, "org/no-such-data", tmp_path / "out")
    assert r.exit_code == 1
    assert "org/no-such-data: no such file or directory, and the Hub data set" in r.output
    assert not (tmp_path / "out").exists()
