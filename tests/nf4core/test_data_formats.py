"""The data shapes people have, each written by its real writer where there is one (json, pyarrow,
datasets), mapped to our records: the expected conversations are written out by hand here."""

from __future__ import annotations

import json

import pytest

from nf4core.data_files import find_data, read_records
from nf4core.dataset import DataConfig, load_dataset
from nf4core.jsonl import DataFormatError
from nf4core.tokenizer import Tokenizer

from .tiny_models import CHATML, tiny_tokenizer

ALPACA = [
    {"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
    {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."},
]
ALPACA_MESSAGES = [
    [
        {"role": "user", "content": "Add the numbers.\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ],
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records_of(spec, data_format="auto"):
    files = find_data(spec)
    return read_records(files.train, data_format=data_format)[0]


def messages_of(spec, data_format="auto"):
    return [r.fields["messages"] for r in records_of(spec, data_format)]


def test_alpaca_jsonl_and_json_array(tmp_path):
    assert messages_of(jsonl(tmp_path / "a.jsonl", ALPACA)) == ALPACA_MESSAGES
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(ALPACA, indent=2))
    records = records_of(array)
    assert [r.fields["messages"] for r in records] == ALPACA_MESSAGES
    assert [r.format for r in records] == ["alpaca", "alpaca"]
    assert records[1].where == f"{array}: record 2"


def test_sharegpt(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    assert messages_of(jsonl(tmp_path / "s.jsonl", [row])) == [
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    ]
    row["conversations"][1]["from"] = "observation"
    with pytest.raises(
        DataFormatError, match=r"s2.jsonl:1: conversations\[1\].from: unknown speaker 'observation'"
    ):
        records_of(jsonl(tmp_path / "s2.jsonl", [row]))


def test_openai_tool_calls_and_content_parts(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Add"}, {"type": "text", "text": "1 and 2"}],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "3"},
            {"role": "assistant", "content": "It is 3."},
        ],
        "tools": [{"type": "function", "function": {"name": "add"}}],
    }
    (record,) = records_of(jsonl(tmp_path / "t.jsonl", [row]))
    assert record.format == "messages"
    assert record.fields["messages"] == [
        {"role": "user", "content": "Add\n1 and 2"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "assistant", "content": "It is 3."},
    ]
    assert record.fields["tools"] == row["tools"]
    row["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x"}})
    with pytest.raises(
        DataFormatError,
        match=r"messages\[0\]\.content\[2\]: a content part of type 'image_url' \(only text parts\)",
    ):
        records_of(jsonl(tmp_path / "t2.jsonl", [row]))


def test_trl_conversational_prompt_completion_learns_the_completion_only(tmp_path):
    row = {
        "prompt": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"},
            {"role": "user", "content": "quick"},
        ],
        "completion": [{"role": "assistant", "content": "brown fox"}],
    }
    (record,) = records_of(jsonl(tmp_path / "p.jsonl", [row]))
    assert (record.kind, record.format, record.fields["first_target"]) == (
        "chat",
        "prompt-completion",
        3,
    )
    tok = Tokenizer(
        tiny_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML
    )
    train, _ = load_dataset(DataConfig(tmp_path / "p.jsonl"), tok)
    (example,) = train.examples
    assert tok.decode(example.input_ids[example.loss_mask].tolist()) == "brown fox<|im_end|>\n"


TOOLS_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}"
    "{% if message.tool_calls %}{{ message.tool_calls[0].function.name + '()' }}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_tool_calls_and_weights_in_the_loss_mask(tmp_path):
    call = {"type": "function", "function": {"name": "add", "arguments": "{}"}}
    row = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world", "weight": 0},
            {"role": "user", "content": "quick"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "fox"},
            {"role": "assistant", "content": "brown"},
        ]
    }
    tok = Tokenizer(
        tiny_tokenizer(),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=TOOLS_TEMPLATE,
    )
    train, _ = load_dataset(DataConfig(jsonl(tmp_path / "w.jsonl", [row])), tok)
    (example,) = train.examples
    masked = tok.decode(example.input_ids[example.loss_mask].tolist())
    assert masked == "add()<|im_end|>\nbrown<|im_end|>\n"  # not "world": its weight is 0
    row["messages"][1]["weight"] = 0.5
    with pytest.raises(DataFormatError, match=r"w2.jsonl:1: messages\[1\]\.weight must be 0 or 1"):
        read_records(jsonl(tmp_path / "w2.jsonl", [row]))


def test_a_template_without_tool_calls_is_refused_by_name(tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    }
    tok = Tokenizer(
        tiny_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML
    )
    with pytest.raises(
        DataFormatError,
        match=r"c.jsonl:1: the chat template does not render tool calls \(messages\[1\]\.tool_calls\)",
    ):
        load_dataset(DataConfig(jsonl(tmp_path / "c.jsonl", [row])), tok)


def test_format_override_of_an_ambiguous_file(tmp_path):
    rows = [{**ALPACA[0], "text": "### Instruction: Add the numbers. ### Response: 3"}]
    path = jsonl(tmp_path / "amb.jsonl", rows)
    assert messages_of(path) == ALPACA_MESSAGES[:1]
    (record,) = records_of(path, "text")
    assert (record.kind, record.fields) == ("text", {"text": rows[0]["text"]})
    with pytest.raises(
        DataFormatError, match=r"amb.jsonl:1: 'conversations' must be a non-empty list"
    ):
        records_of(path, "sharegpt")


def test_parquet_with_nulls_written_by_pyarrow(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = [
        {"instruction": "Add the numbers.", "input": "1 2", "output": "3", "system": None},
        {"instruction": "Say hi.", "input": None, "output": "hi", "system": "Be kind."},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert messages_of(tmp_path / "train.parquet") == ALPACA_MESSAGES
    # messages in a table: a column of structs, absent keys filled with nulls
    chats = [
        {
            "messages": [
                {"role": "user", "content": "q", "tool_calls": None},
                {"role": "assistant", "content": "a", "tool_calls": None},
            ]
        }
    ]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    assert messages_of(tmp_path / "chat.parquet") == [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{**ALPACA[0], "system": None}, ALPACA[1]])
    train.save_to_disk(str(tmp_path / "one"))
    assert messages_of(tmp_path / "one") == ALPACA_MESSAGES
    valid = datasets.Dataset.from_list([{"instruction": "V", "input": "", "output": "v"}])
    datasets.DatasetDict({"train": train, "validation": valid, "test": valid}).save_to_disk(
        str(tmp_path / "dict")
    )
    files = find_data(tmp_path / "dict")
    assert files.train == (tmp_path / "dict" / "train",)
    assert files.valid == (tmp_path / "dict" / "validation",)
    assert [r.fields["messages"] for r in read_records(files.valid)[0]] == [
        [{"role": "user", "content": "V"}, {"role": "assistant", "content": "v"}]
    ]


def test_split_files_in_a_directory(tmp_path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    for name in (
        "train-00000-of-00002.jsonl",
        "train-00001-of-00002.jsonl",
        "validation.jsonl",
        "test.jsonl",
    ):
        jsonl(data / name, ALPACA[:1])
    files = find_data(tmp_path / "repo")
    assert files.train == (data / "train-00000-of-00002.jsonl", data / "train-00001-of-00002.jsonl")
    assert files.valid == (data / "validation.jsonl",)
    jsonl(data / "extra.jsonl", ALPACA[:1])
    with pytest.raises(DataFormatError, match="extra.jsonl: cannot tell which split"):
        find_data(tmp_path / "repo")
