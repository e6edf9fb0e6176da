"""JSONL data: shapes, loss masks, truncation, bad lines, split, shuffling and batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nf4core.dataset import DataConfig, batches, epoch_order, load_dataset
from nf4core.jsonl import DataFormatError, read_jsonl
from nf4core.tokenizer import Tokenizer

from .tiny_models import CHATML, tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(
        tiny_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML
    )


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def masked_text(tok, example):
    return tok.decode(example.input_ids[example.loss_mask].tolist())


def test_three_shapes_and_their_loss_masks(tmp_path, tok):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "def add"},
        ]
    }
    path = write(
        tmp_path / "d.jsonl",
        [{"text": "The quick fox"}, "", {"prompt": "Hello", "completion": " world"}, chat],
    )
    train, valid = load_dataset(DataConfig(path), tok)
    assert valid is None and len(train) == 3 and train.truncated == 0
    text, completion, conversation = train.examples
    assert text.loss_mask.all()
    assert tok.decode(text.input_ids.tolist()) == "The quick fox<|im_end|>"
    assert masked_text(tok, completion) == " world<|im_end|>"
    assert not completion.loss_mask[: len(tok.encode("Hello"))].any()
    rendered = tok.apply_chat_template(chat["messages"])
    assert conversation.input_ids.tolist() == tok.encode(rendered)
    assert masked_text(tok, conversation) == "hello there<|im_end|>\ndef add<|im_end|>\n"


def test_truncation_is_counted(tmp_path, tok):
    path = write(
        tmp_path / "d.jsonl",
        [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hi"}],
    )
    train, _ = load_dataset(DataConfig(path, max_length=5), tok)
    assert train.truncated == 1
    assert [e.input_ids.size for e in train.examples] == [5, len(tok.encode("Hi")) + 1]


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object, got list"),
        ('{"prompt": "a"}', "a 'prompt' without a 'completion' has nothing to learn from"),
        ('{"prompt": "a", "completion": 3}', "'prompt' and 'completion' must both be strings"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\]\.content must be a string"),
        ('{"txt": "a"}', r"no known record shape \(keys: \['txt'\]\)"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    path = write(tmp_path / "bad.jsonl", [{"text": "fine"}, line, {"text": "fine"}])
    with pytest.raises(DataFormatError, match=problem) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and "\n" not in str(err.value)
    records, skipped = read_jsonl(path, skip_bad_lines=True)
    assert (len(records), skipped) == (2, 1)


def test_unreadable_data_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not UTF-8"):
        read_jsonl(path)
    empty = write(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataFormatError, match="empty.jsonl: no usable records"):
        read_jsonl(empty)
    with pytest.raises(DataFormatError, match="absent.jsonl: cannot read"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_split_and_valid_file(tmp_path, tok):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write(tmp_path / "d.jsonl", rows)
    train, valid = load_dataset(DataConfig(path, valid_fraction=0.25, seed=3), tok)
    assert (len(train), len(valid)) == (15, 5)
    seen = sorted(tok.decode(e.input_ids.tolist()) for e in train.examples + valid.examples)
    assert seen == sorted(f"row {i}<|im_end|>" for i in range(20))
    again, _ = load_dataset(DataConfig(path, valid_fraction=0.25, seed=3), tok)
    assert [e.input_ids.tolist() for e in again.examples] == [
        e.input_ids.tolist() for e in train.examples
    ]
    train, valid = load_dataset(DataConfig(path, valid=write(tmp_path / "v.jsonl", rows[:2])), tok)
    assert (len(train), len(valid)) == (20, 2)
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        DataConfig(path, valid_fraction=1.0)


def test_shuffling_is_seeded():
    assert epoch_order(50, 1, 0).tolist() == epoch_order(50, 1, 0).tolist()
    assert epoch_order(50, 1, 0).tolist() != epoch_order(50, 1, 1).tolist()
    assert epoch_order(50, 1, 0).tolist() != epoch_order(50, 2, 0).tolist()
    assert sorted(epoch_order(50, 1, 0).tolist()) == list(range(50))


def test_padded_and_packed_batches(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "a" * (i + 1)} for i in range(7)])
    data, _ = load_dataset(DataConfig(path), tok)
    lengths = [e.input_ids.size for e in data.examples]
    padded = list(batches(data, 3, pad_id=0, seed=5))
    assert [b.input_ids.shape[0] for b in padded] == [3, 3, 1]
    assert sum(int(b.attention_mask.sum()) for b in padded) == sum(lengths)
    for b in padded:
        assert b.attention_mask[:, 0].all() and (b.input_ids[~b.attention_mask] == 0).all()
        assert not b.loss_mask[~b.attention_mask].any()
    packed = list(batches(data, 2, pad_id=0, packing=True, max_length=8, shuffle=False))
    rows = np.concatenate([b.input_ids for b in packed])
    segments = np.concatenate([b.segment_ids for b in packed])
    positions = np.concatenate([b.position_ids for b in packed])
    assert rows.shape[1] == 8 and int((segments > 0).sum()) == sum(lengths)
    first = data.examples[0].input_ids
    assert rows[0, : first.size].tolist() == first.tolist()
    assert positions[0, first.size] == 0 and segments[0, first.size] == 2
    with pytest.raises(ValueError, match="does not fit a packed row"):
        list(batches(data, 2, pad_id=0, packing=True, max_length=3))
