"""`export` to GGUF from the library: each byte-level pre-tokenizer we convert reads back to the
same token ids, RoPE scalings survive the round trip, memory does not grow with the model, and what
cannot be written is refused before anything is."""

from __future__ import annotations

import dataclasses
import tracemalloc

import pytest
from tokenizers import Regex, normalizers, pre_tokenizers

import nf4core
from backends.export import export
from nf4core.gguf_write import GGUFExportError
from nf4core.tokenizer import _SPLIT_PRE
from tests.nf4core.tiny_models import (
    add_sentencepiece_metadata,
    hf_config,
    random_weights,
    tiny_tokenizer,
    write_gguf,
    write_hf_dir,
)

TEXTS = [
    "Hello world! I'm here, they've 12345 apples.\n\n  Indented   text\t tab",
    "naïve café 日本語のテキスト <|im_start|>user\nhi<|im_end|>",
]


def _pre(kind: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "gpt-2")
    if kind == "gpt-2":
        return byte_level, None
    if kind == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence(
            [digits, pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ), None
    split = pre_tokenizers.Split(Regex(_SPLIT_PRE[kind]), behavior="isolated")
    return pre_tokenizers.Sequence(
        [split, byte_level]
    ), normalizers.NFC() if kind == "qwen2" else None


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_tokenizers_read_back_to_the_same_ids(tmp_path, kind):
    config = hf_config("qwen2" if kind == "qwen2" else "llama")
    tok = tiny_tokenizer()
    tok.pre_tokenizer, normalizer = _pre(kind)
    if normalizer is not None:
        tok.normalizer = normalizer
    model = write_hf_dir(tmp_path / "hf", config, random_weights(config), tok)
    out = export(model, tmp_path / "m.gguf", "gguf", "float32", echo=lambda s: None)
    source, back = nf4core.open_model(model), nf4core.open_model(out)
    assert back.metadata["tokenizer.ggml.pre"] == kind
    for text in TEXTS:
        assert back.tokenizer().encode(text) == source.tokenizer().encode(text), text
        ids = source.tokenizer().encode(text)
        assert back.tokenizer().decode(ids) == source.tokenizer().decode(ids)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_scaling_round_trips(tmp_path, scaling):
    config = hf_config("llama", rope_scaling=scaling)
    model = write_hf_dir(tmp_path / "hf", config, random_weights(config), tiny_tokenizer())
    out = export(model, tmp_path / "m.gguf", "gguf", "float32", echo=lambda s: None)
    want = dataclasses.replace(nf4core.open_model(model).config, extra={})
    assert dataclasses.replace(nf4core.open_model(out).config, extra={}) == want


def test_what_gguf_cannot_hold_is_refused_before_writing(tmp_path):
    config = hf_config("mistral", sliding_window=64)
    model = write_hf_dir(tmp_path / "hf", config, random_weights(config), tiny_tokenizer())
    with pytest.raises(GGUFExportError, match="sliding_window 64 cannot be written as GGUF"):
        export(model, tmp_path / "m.gguf", "gguf", echo=lambda s: None)
    config = hf_config("llama")
    weights = random_weights(config)
    weights["model.norm.weight"][0] = 1e5  # beyond float16: refused by name, not written as inf
    model = write_hf_dir(tmp_path / "big", config, weights, tiny_tokenizer())
    export(model, tmp_path / "ok.gguf", "gguf", "bfloat16", echo=lambda s: None)  # norms are F32
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5
    model = write_hf_dir(tmp_path / "big2", config, weights, tiny_tokenizer())
    with pytest.raises(GGUFExportError, match="'model.layers.0.mlp.up_proj.weight' holds values"):
        export(model, tmp_path / "f16.gguf", "gguf", "float16", echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "big2", "hf", "ok.gguf"]


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gguf_export_memory_does_not_grow_with_the_model(tmp_path):
    """A 2-layer and an 8-layer model of one width: the peak grows by less than a tenth of what the
    added layers weigh in float32 (tensors stream through one at a time)."""
    models, added = [], 0
    for layers in (2, 8):
        config = hf_config(
            "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=layers
        )
        weights = random_weights(config)
        models.append(write_hf_dir(tmp_path / f"m{layers}", config, weights, tiny_tokenizer()))
        added = sum(w.nbytes for n, w in weights.items() if n.startswith("model.layers.")) * 6 / 8
    peaks = [
        _peak_bytes(lambda m=m: export(m, tmp_path / f"{m.name}.gguf", "gguf", "q8_0", echo=print))
        for m in models
    ]
    assert peaks[1] - peaks[0] < added / 10, (peaks, added)


def test_a_sentencepiece_tokenizer_json_becomes_a_llama_gguf_tokenizer(tmp_path):
    """GGUF (SentencePiece vocabulary) -> HF directory (tokenizer.json) -> GGUF again: the same ids,
    typed tokens and special tokens all the way."""
    config = hf_config("llama", vocab=567)  # the SentencePiece test vocabulary
    weights = random_weights(config)
    first = write_gguf(
        tmp_path / "sp.gguf", config, weights, add_metadata=add_sentencepiece_metadata
    )
    hf = export(first, tmp_path / "hf", "hf", "float32", echo=lambda s: None)
    again = export(hf, tmp_path / "again.gguf", "gguf", "float32", echo=lambda s: None)
    tokenizers = [nf4core.open_model(p).tokenizer() for p in (first, hf, again)]
    texts = [*TEXTS, "  leading spaces and the quick brown fox", "Numbers 12345"]
    for text in texts:
        ids = tokenizers[0].encode(text)
        assert [t.encode(text) for t in tokenizers[1:]] == [ids, ids], text
        assert tokenizers[2].decode(ids) == tokenizers[0].decode(ids)
    metadata = nf4core.open_model(again).metadata
    assert metadata["tokenizer.ggml.model"] == "llama"
    assert metadata["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]
    assert metadata["tokenizer.ggml.add_space_prefix"] is True
    assert [t.bos_token for t in tokenizers] == ["<s>"] * 3
