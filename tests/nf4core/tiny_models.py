"""Tiny random Llama-family models written as Hugging Face directories and as GGUF files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nf4core.model_config import ModelConfig
from nf4core.sources.layout import expected_shapes
from nf4core.sources.safetensors_io import save_safetensors

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 12345 and 678, naïve café, 日本語のテキスト.",
    "Hello world! hello World?",
] * 4


def hf_config(arch: str = "llama", tie: bool = False, vocab: int = 300, **overrides) -> dict:
    config = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    }
    config.update(overrides)
    return config


def random_weights(config: dict, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(ModelConfig.from_hf_config(config))
    return {
        name: rng.standard_normal(shape).astype(np.float32).astype(dtype)
        for name, shape in shapes.items()
    }


def tiny_tokenizer(vocab: int = 300) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    return tok


def write_hf_dir(
    directory: Path,
    config: dict,
    weights: dict[str, np.ndarray],
    tokenizer: tokenizers.Tokenizer | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_safetensors(directory / "model.safetensors", weights)
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}
            )
        )
    return directory


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of Llama models (written independently of
    nf4core so the un-permutation is tested against it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path,
    config: dict,
    weights: dict[str, np.ndarray],
    qtype: str = "F32",
    tokenizer: tokenizers.Tokenizer | None = None,
    arch: str | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    add_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
    raw: dict[str, tuple[str, np.ndarray]] | None = None,
) -> Path:
    """A GGUF file as llama.cpp's converter writes it: q/k rows permuted for Llama-type models,
    2-D weights in `qtype`, 1-D tensors in F32. `raw` stores some tensors (Hugging Face name ->
    (type name, block bytes as uint8 rows)) as given, unpermuted."""
    arch = arch or config["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    if tokenizer is not None:
        state = json.loads(tokenizer.to_str())
        vocab = state["model"]["vocab"]
        tokens = sorted(vocab, key=vocab.get)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(
            [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
        )
        assert (vocab["<|im_start|>"], vocab["<|im_end|>"]) == (
            config["bos_token_id"],
            config["eos_token_id"],
        )
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    if add_metadata is not None:
        add_metadata(w)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, value in weights.items():
        if name in (raw or {}):
            raw_type, blocks = raw[name]
            w.add_tensor(gguf_name(name), blocks, raw_dtype=gguf.GGMLQuantizationType[raw_type])
            continue
        value = np.asarray(value, dtype=np.float32)
        if arch in ("llama", "mistral") and ".q_proj." in name:
            value = llama_cpp_permute(value, config["num_attention_heads"])
        elif arch in ("llama", "mistral") and ".k_proj." in name:
            value = llama_cpp_permute(value, config["num_key_value_heads"])
        if value.ndim == 2 and qtype != "F32":
            w.add_tensor(gguf_name(name), gguf.quants.quantize(value, qt), raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(name), value)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A tiny SentencePiece-style vocabulary as Llama 2 GGUFs store it: <unk>, <s>, </s>, 256 byte
    tokens, then pieces ("▁" marks a space) with decreasing scores. Returns tokens, scores, types."""
    words = sorted({w for line in CORPUS for w in line.replace("\n", " ").split(" ") if w})
    pieces: list[str] = []
    for word in ["\u2581" + w for w in words]:
        for end in range(1, len(word) + 1):
            for start in range(end):
                piece = word[start:end]
                if piece not in pieces and len(piece) <= 4:
                    pieces.append(piece)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def add_sentencepiece_metadata(w: gguf.GGUFWriter) -> None:
    tokens, scores, types = sentencepiece_vocab()
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_bos_token(True)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """Each value as its 2 little-endian float16 bytes: shape (n, 2)."""
    return np.asarray(values, "<f2").reshape(-1, 1).view(np.uint8)


def pack_q4_k(
    d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, mins: np.ndarray, q: np.ndarray
) -> np.ndarray:
    """Q4_K blocks (256 values, 144 bytes each) from per-block d, dmin (n,), 6-bit scales and mins
    (n, 8) and 4-bit quants (n, 256), packed by hand from the format's layout: f16 d, f16 dmin,
    12 bytes of scales/mins (low 6 bits of sub-blocks 0-3 in bytes 0-7, their top 2 bits holding
    the high bits of sub-blocks 4-7, whose low 4 bits fill bytes 8-11), then 128 bytes of nibbles
    (bytes 32i..32i+31: low nibbles are values 64i.., high nibbles values 64i+32..)."""
    n = q.shape[0]
    packed = np.zeros((n, 12), np.int64)
    packed[:, 0:4] = scales[:, 0:4] | (scales[:, 4:8] >> 4) << 6
    packed[:, 4:8] = mins[:, 0:4] | (mins[:, 4:8] >> 4) << 6
    packed[:, 8:12] = (scales[:, 4:8] & 15) | (mins[:, 4:8] & 15) << 4
    chunks = q.reshape(n, 4, 2, 32)
    qs = (chunks[:, :, 0, :] | chunks[:, :, 1, :] << 4).reshape(n, 128)
    return np.concatenate(
        [f16_bytes(d), f16_bytes(dmin), packed.astype(np.uint8), qs.astype(np.uint8)], axis=1
    )
