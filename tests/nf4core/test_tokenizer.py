"""Tokenizers rebuilt from GGUF metadata: SentencePiece and byte-level BPE, with transformers' own
GGUF tokenizer conversion as the oracle where it follows the models' rules."""

from __future__ import annotations

import pytest

from nf4core import open_model

from .tiny_models import (
    CORPUS,
    add_sentencepiece_metadata,
    hf_config,
    random_weights,
    sentencepiece_vocab,
    tiny_tokenizer,
    write_gguf,
)

TEXTS = [
    "The quick brown fox",
    "hello world",
    "unknown ünïcode ✓ and bytes",
    "numbers 12345",
    "two  spaces\nnewline",
]


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = hf_config("llama", vocab=len(sentencepiece_vocab()[0]))
    path = write_gguf(
        tmp_path / "spm.gguf",
        config,
        random_weights(config),
        add_metadata=add_sentencepiece_metadata,
    )
    ours = open_model(path).tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + CORPUS[:4]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 1  # <s>: Llama's SentencePiece tokenizers add it
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
            ids, skip_special_tokens=True
        )
    assert ours.decode(ours.encode("hello world", add_special_tokens=False)) == "hello world"
    assert ours.encode("\u00fc", add_special_tokens=False)[1:] == [3 + 0xC3, 3 + 0xBC]  # bytes


def test_sentencepiece_dummy_prefix_is_always_added(tmp_path):
    # SentencePiece, llama.cpp and Llama 2's own tokenizer.json (Prepend + Replace normalizer) put
    # one "▁" before every text, even one that starts with a space, and again after a special token
    # written in the text. transformers' GGUF conversion (Metaspace, prepend "first") does neither,
    # so these two cases are checked here against the SentencePiece rule instead.
    config = hf_config("llama", vocab=len(sentencepiece_vocab()[0]))
    path = write_gguf(
        tmp_path / "spm.gguf",
        config,
        random_weights(config),
        add_metadata=add_sentencepiece_metadata,
    )
    ours = open_model(path).tokenizer()
    tokens = sentencepiece_vocab()[0]
    assert [tokens[i] for i in ours.encode(" hello", add_special_tokens=False)][0] == "\u2581"
    assert ours.decode(ours.encode(" hello world", add_special_tokens=False)) == " hello world"
    after_special = ours.encode("</s>hello", add_special_tokens=False)
    assert after_special[0] == 2 and tokens[after_special[1]].startswith("\u2581")


@pytest.mark.parametrize(
    "pre,pieces",
    [
        ("default", ["a", "Ġ12345"]),  # GPT-2: a run of digits with its space
        ("smollm", ["a", "Ġ", "1", "2", "3", "4", "5"]),  # single digits, split before ByteLevel
        ("llama-bpe", ["a", "Ġ", "123", "45"]),  # Llama 3: up to three digits
        ("qwen2", ["a", "Ġ", "1", "2", "3", "4", "5"]),
    ],
)
def test_gguf_pre_tokenizers_split_as_their_models_do(tmp_path, monkeypatch, pre, pieces):
    import gguf

    config = hf_config("llama")
    monkeypatch.setattr(
        gguf.GGUFWriter,
        "add_tokenizer_pre",
        lambda self, _: self.add_string("tokenizer.ggml.pre", pre),
    )
    path = write_gguf(
        tmp_path / "m.gguf", config, random_weights(config), tokenizer=tiny_tokenizer()
    )
    backend = open_model(path).tokenizer().backend
    assert [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("a 12345")] == pieces
    assert (backend.normalizer is not None) == (pre == "qwen2")  # Qwen2 normalizes to NFC
