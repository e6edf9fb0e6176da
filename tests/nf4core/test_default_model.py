"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) read, tokenized and quantized,
checked against transformers (which reads the same GGUF) and bitsandbytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nf4core import (
    DataConfig,
    NF4Tensor,
    default_model_path,
    dequantize,
    load_dataset,
    open_model,
    quantize_model,
)
from nf4core.sources import GGUFSource, expected_shapes

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STRINGS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "Numbers: 3.14159, 1e-5, 2026-11-29",
    "naïve café, Ελληνικά, русский, 日本語, 中文, 한국어, emoji 🤗🚀",
    "def add(a, b):\n\treturn a + b  # code\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>text after a special token",
    "tabs\tand\r\nnewlines\n\n\n",
]
MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return open_model(path)


def test_config_and_tensor_shapes(source):
    c = source.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == (
        "llama",
        49152,
        576,
        1536,
    )
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert c.tie_word_embeddings and "lm_head.weight" not in source.tensor_names()
    assert len(source.tensor_names()) == 272
    shapes = expected_shapes(c)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.norm.weight",
    ):
        value = source.read(name)
        assert value.shape == shapes[name] and value.dtype == np.float32


def test_tensors_equal_what_transformers_reads_from_the_gguf(source):
    # transformers de-quantizes and un-permutes the GGUF itself: an independent reader of the file
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source.path.parent, gguf_file=source.path.name, dtype=torch.float32
    )
    state = model.state_dict()
    assert sorted(set(state) - {"lm_head.weight"}) == sorted(source.tensor_names())
    for name in source.tensor_names():
        np.testing.assert_array_equal(source.read(name), state[name].numpy(), err_msg=name)


def test_tokenizer_matches_transformers(source):
    ours = source.tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(
        source.path.parent, gguf_file=source.path.name
    )
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    for generation in (False, True):
        prompt = ours.apply_chat_template(MESSAGES, add_generation_prompt=generation)
        assert prompt == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=generation
        )
    assert ours.encode(prompt)[:3] == [1, 9690, 198]  # <|im_start|> system \n


def test_chat_record_masks_the_assistant_turn(source, tmp_path):
    tokenizer = source.tokenizer()
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES + [{"role": "assistant", "content": "6."}]}))
    train, _ = load_dataset(DataConfig(path), tokenizer)
    [example] = train.examples
    masked = tokenizer.decode(example.input_ids[example.loss_mask].tolist())
    assert masked == "4.<|im_end|>\n6.<|im_end|>\n"


def test_quantized_default_model_loads_in_transformers(source, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    out = quantize_model(source, tmp_path / "smollm2-nf4")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ours = open_model(out)
    name = "model.layers.7.self_attn.k_proj.weight"
    weight = model.model.layers[7].self_attn.k_proj.weight
    assert isinstance(model.model.layers[7].self_attn.k_proj, bnb.nn.Linear4bit)
    mine = ours.read(name)
    assert isinstance(mine, NF4Tensor) and mine.shape == (192, 576)
    theirs = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().numpy()
    np.testing.assert_allclose(dequantize(mine, "bfloat16").astype(np.float32), theirs, rtol=2**-7)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in STRINGS[:4]:
        assert tokenizer(text)["input_ids"] == source.tokenizer().encode(text)
    ids = torch.tensor([source.tokenizer().encode("The capital of France is")])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
