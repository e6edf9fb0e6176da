"""Records that cannot train are found before the first step: no target token (left out and named
by file:line) and absurdly long lines (refused by line number before they are parsed)."""

from __future__ import annotations

import json

import pytest

from nf4core.dataset import DataConfig, load_dataset
from nf4core.jsonl import MAX_LINE_BYTES, DataFormatError, read_jsonl
from nf4core.tokenizer import Tokenizer

from .tiny_models import CHATML, tiny_tokenizer


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_records_without_target_tokens_are_left_out_and_named(tmp_path):
    tok = Tokenizer(tiny_tokenizer(), chat_template=CHATML)  # no BOS/EOS: empty text is empty
    path = write(
        tmp_path / "d.jsonl",
        [
            {"text": "The quick fox"},
            {"prompt": "hello " * 40, "completion": " world"},  # the prompt fills max_length
            {"text": ""},
            {"prompt": "Hello", "completion": " world"},
        ],
    )
    train, _ = load_dataset(DataConfig(path, max_length=16), tok)
    assert train.no_targets == (f"{path}:2", f"{path}:3")
    assert len(train) == 2 and all(e.loss_mask[1:].any() for e in train.examples)


@pytest.mark.parametrize("skip_bad_lines", [False, True])
def test_a_line_over_the_limit_is_refused_by_number(tmp_path, skip_bad_lines):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "ok"}\n')
        f.write('{"text": "' + "x" * MAX_LINE_BYTES + '"}\n')
    with pytest.raises(DataFormatError, match=rf"^{path}:2: the line is longer than 10 MiB"):
        read_jsonl(path, skip_bad_lines)


def test_a_line_at_the_limit_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    body = '{"text": ""}'
    path.write_text(body[:-2] + "x" * (MAX_LINE_BYTES - len(body) - 1) + '"}\n')
    records, _ = read_jsonl(path)
    assert len(records[0].fields["text"]) == MAX_LINE_BYTES - len(body) - 1
