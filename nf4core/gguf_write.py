"""A Llama-family model written as a GGUF file that llama.cpp reads (with the `gguf` package).

What llama.cpp's converter writes: `general.*` and `{arch}.*` hyper-parameters, the tokenizer as
`tokenizer.ggml.*` with `tokenizer.chat_template`, tensors under llama.cpp's names, the q/k rows of
Llama-type models permuted for its RoPE kernel, 1-D tensors in F32 and 2-D ones in the chosen type.
Shapes and types are known up front, so the file streams: tensor infos first, then one tensor at a
time, into a temporary sibling that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import current_umask, os_errors_name
from .model_config import ModelConfig
from .sources.gguf_file import (
    LLAMA3_CANDIDATES,
    gguf_name,
    llama3_rope_factors,
    permute_rope_rows,
)
from .tokenizer import SPIECE_SPACE, Tokenizer

GGUF_DTYPES = ("bfloat16", "float16", "float32", "q8_0")
_TYPE_OF = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = (
    *(1, 2, 3, 4, 5, 6),
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_Q8_0_BLOCK = 32
_F16_MAX = 65504.0
_BF16_MAX = 3.3895e38  # larger float32 values round to infinity in bfloat16


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF (the message names what and why)."""


def gguf_package():
    """The `gguf` package, which writing a GGUF file needs (it is optional for everything else)."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError(
            "writing a GGUF file needs the `gguf` package, which is not installed "
            "(pip install gguf)"
        ) from None
    return gguf


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture name: Mistral is written as llama, as llama.cpp's converter does."""
    if config.architecture != "mistral":
        return config.architecture
    if config.sliding_window is not None:
        raise GGUFExportError(
            f"a Mistral model with sliding_window {config.sliding_window} cannot be written as "
            "GGUF: llama.cpp runs Mistral as llama, without a sliding window (not supported)"
        )
    return "llama"


def tensor_type(shape: tuple[int, ...], dtype: str) -> str:
    """The GGUF type of a tensor: F32 for 1-D ones (norms, biases); F16 where rows do not split
    into Q8_0's blocks of 32, as llama.cpp's converter falls back."""
    if len(shape) == 1:
        return "F32"
    if dtype == "q8_0" and shape[-1] % _Q8_0_BLOCK:
        return "F16"
    return _TYPE_OF[dtype]


def _encode(gguf, name: str, value: np.ndarray, kind: str) -> np.ndarray:
    """The tensor's bytes in GGUF type `kind`; GGUFExportError if a value does not fit it."""
    if kind == "F32":
        return np.ascontiguousarray(value, np.float32)
    largest = float(np.abs(value).max(initial=0.0))
    # Q8_0 stores each block's scale, max|x| / 127, as float16
    limit = {"F16": _F16_MAX, "Q8_0": _F16_MAX * 127, "BF16": _BF16_MAX}[kind]
    if largest > limit:
        raise GGUFExportError(
            f"tensor {name!r} holds values up to {largest:g}, too large for {kind}; "
            "nothing was written"
        )
    if kind == "F16":
        return value.astype(np.float16)
    return gguf.quants.quantize(value, gguf.GGMLQuantizationType[kind])


def _plan(gguf, shapes: dict[str, tuple[int, ...]], dtype: str):
    """(GGUF name, numpy shape, GGUF type, byte count) of each tensor, in file order."""
    plan = []
    for name, shape in shapes.items():
        kind = tensor_type(shape, dtype)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size
        plan.append((name, gguf_name(name), shape, kind, nbytes))
    return plan


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, np.ndarray]],
    tokenizer_keys: list[tuple[str, object, str]],
    dtype: str = "bfloat16",
    model_name: str = "",
) -> Path:
    """Write the model to `path`: `shapes` (Hugging Face names, file order) announces the tensors,
    `tensors` yields them (float32, same order); `tokenizer_keys` from `tokenizer_metadata`."""
    gguf = gguf_package()
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    path = Path(path)
    arch = gguf_architecture(config)
    plan = _plan(gguf, shapes, dtype)
    rope_freqs = _rope_freqs(config)
    writer = gguf.GGUFWriter(None, arch)
    _add_model_keys(gguf, writer, config, dtype, model_name)
    for key, value, kind in tokenizer_keys:
        _add_key(gguf, writer, key, value, kind)
    for _, tensor_name, shape, kind, nbytes in plan:
        numpy_dtype = {"F32": np.float32, "F16": np.float16}.get(kind, np.float32)
        raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        writer.add_tensor_info(tensor_name, shape, np.dtype(numpy_dtype), nbytes, raw_dtype=raw)
    if rope_freqs is not None:
        writer.add_tensor_info(
            "rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes
        )
    with os_errors_name(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        with os_errors_name(path):
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(gguf, writer, config, arch, plan, tensors)
            if rope_freqs is not None:
                writer.write_tensor_data(rope_freqs)
            writer.close()
            os.chmod(tmp, 0o666 & ~current_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _write_tensors(gguf, writer, config: ModelConfig, arch: str, plan, tensors) -> None:
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    pending = iter(plan)
    for name, value in tensors:
        expected, _, shape, kind, _ = next(pending, (None,) * 5)
        if name != expected or tuple(value.shape) != tuple(shape):
            raise AssertionError(
                f"tensor {name!r} {value.shape} out of order (expected {expected!r})"
            )
        value = np.asarray(value, np.float32)
        module = name.split(".")[-2] if name.count(".") >= 2 else ""
        if arch == "llama" and module in heads:
            value = permute_rope_rows(value, heads[module])
        writer.write_tensor_data(_encode(gguf, name, value, kind))
        del value
    missing = next(pending, None)
    if missing is not None:
        raise AssertionError(f"tensor {missing[0]!r} was announced but not given")


def _rope_freqs(config: ModelConfig) -> np.ndarray | None:
    """Llama 3's RoPE scaling is stored as a tensor of per-frequency factors, as llama.cpp does."""
    scaling = config.rope_scaling
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "llama3":
        return None
    if not any(all(scaling.get(k) == v for k, v in c.items()) for c in LLAMA3_CANDIDATES):
        raise GGUFExportError(
            f"rope_scaling {json.dumps(scaling)} cannot be written as GGUF (supported: Llama 3's "
            "with factor 8, 16 or 32, linear, none)"
        )
    return llama3_rope_factors(config.rope_theta, config.resolved_head_dim, scaling)


def _add_model_keys(gguf, writer, config: ModelConfig, dtype: str, model_name: str) -> None:
    file_types = {
        "float32": gguf.LlamaFileType.ALL_F32,
        "float16": gguf.LlamaFileType.MOSTLY_F16,
        "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_type("model")
    if model_name:
        writer.add_name(model_name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_types[dtype])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_key_length(config.resolved_head_dim)
    writer.add_value_length(config.resolved_head_dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_key(gguf, writer, key: str, value: object, kind: str) -> None:
    types = gguf.GGUFValueType
    if kind.startswith("array:"):
        writer.add_key_value(key, value, types.ARRAY, types[kind.split(":", 1)[1]])
    else:
        writer.add_key_value(key, value, types[kind])


# general.* keys this writer sets itself (or the gguf writer does)
_OWN_GENERAL_KEYS = (
    "general.architecture",
    "general.type",
    "general.name",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
)


def tokenizer_metadata(source) -> list[tuple[str, object, str]]:
    """The `tokenizer.*` keys of `source` as (key, value, GGUF value type), and from a GGUF file its
    descriptive `general.*` keys (license, organization, ...): copied from a GGUF file; converted
    from a Hugging Face tokenizer.json otherwise."""
    metadata = getattr(source, "metadata", None)
    if isinstance(metadata, dict) and "tokenizer.ggml.tokens" in metadata:
        return [
            (key, value, _value_type(value))
            for key, value in metadata.items()
            if key.startswith("tokenizer.")
            or (key.startswith("general.") and key not in _OWN_GENERAL_KEYS)
        ]
    return _from_tokenizer(source.tokenizer(), source.config, f"{source.path}")


def _value_type(value: object) -> str:
    if isinstance(value, list):
        inner = _value_type(value[0]) if value else "INT32"
        return f"array:{'INT32' if inner == 'UINT32' else inner}"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "UINT32"
    if isinstance(value, float):
        return "FLOAT32"
    return "STRING"


def _pre_tokenizer_name(state: dict, where: str) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) of a tokenizer.json pre-tokenizer (and normalizer)
    that our GGUF reader rebuilds exactly; GGUFExportError for any other."""
    from .tokenizer import _SPLIT_PRE

    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    normalizer = (state.get("normalizer") or {}).get("type")
    name = None
    if steps[-1].get("add_prefix_space"):
        name = None
    elif kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        name = next((n for n, split in _SPLIT_PRE.items() if split == pattern), None)
    if name is not None and normalizer == ("NFC" if name == "qwen2" else None):
        return name
    described = " + ".join(map(str, kinds)) + (f", normalizer {normalizer}" if normalizer else "")
    raise GGUFExportError(
        f"{where}: the tokenizer's pre-tokenizer ({described}) has no GGUF name we know "
        "(supported: GPT-2 byte-level, SmolLM, Llama 3, Qwen2)"
    )


def _from_tokenizer(tokenizer: Tokenizer, config: ModelConfig, where: str):
    state = json.loads(tokenizer.backend.to_str())
    model = state.get("model") or {}
    decoder = (state.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        keys = _byte_level_vocabulary(state, config, where)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        keys = _sentencepiece_vocabulary(state, config, where)
    else:
        raise GGUFExportError(
            f"{where}: only BPE tokenizers (byte-level like GPT-2, or SentencePiece-style with byte "
            f"fallback) can be written as GGUF from a tokenizer.json; this one is "
            f"{model.get('type')} with a {decoder} decoder (not supported)"
        )
    return keys + _special_token_keys(tokenizer, config)


def _token_table(state: dict, config: ModelConfig, where: str, type_of) -> tuple[list, list]:
    """Tokens and token types by id, `vocab_size` long (ids no token has become unused pads)."""
    model = state["model"]
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: type_of(t) for i, t in tokens.items()}
    for added in state.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        if types.get(added["id"]) != _TOKEN_UNKNOWN:
            types[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
    if max(tokens) >= config.vocab_size:
        raise GGUFExportError(
            f"{where}: the tokenizer has token id {max(tokens)}, beyond the model's vocab_size "
            f"{config.vocab_size}"
        )
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
    type_list = [types.get(i, _TOKEN_UNUSED) for i in range(config.vocab_size)]
    return token_list, type_list


def _merge_list(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _byte_level_vocabulary(state: dict, config: ModelConfig, where: str):
    pre = _pre_tokenizer_name(state, where)
    tokens, types = _token_table(state, config, where, lambda token: _TOKEN_NORMAL)
    return [
        ("tokenizer.ggml.model", "gpt2", "STRING"),
        ("tokenizer.ggml.pre", pre, "STRING"),
        ("tokenizer.ggml.tokens", tokens, "array:STRING"),
        ("tokenizer.ggml.token_type", types, "array:INT32"),
        ("tokenizer.ggml.merges", _merge_list(state["model"]), "array:STRING"),
    ]


def _sentencepiece_vocabulary(state: dict, config: ModelConfig, where: str):
    """A SentencePiece-style BPE (Llama 2, Mistral, TinyLlama) as GGUF's "llama" tokenizer: GGUF
    keeps no merges but a score per piece, and a piece merges before those of lower score. A
    piece's score is minus the rank of the first merge that makes it, so merges keep their order."""
    model = state["model"]
    steps = (state.get("normalizer") or {}).get("normalizers") or [state.get("normalizer") or {}]
    kinds = [step.get("type") for step in steps]
    replaces_spaces = kinds[-1:] == ["Replace"] and steps[-1].get("content") == SPIECE_SPACE
    if state.get("pre_tokenizer") or not replaces_spaces or kinds[:-1] not in ([], ["Prepend"]):
        described = " + ".join(map(str, kinds)) or "none"
        raise GGUFExportError(
            f"{where}: a SentencePiece-style tokenizer with normalizer {described} and "
            f"pre-tokenizer {(state.get('pre_tokenizer') or {}).get('type')} cannot be written "
            "as GGUF (supported: the normalizer Prepend('▁') + Replace(' ', '▁') or Replace alone, "
            "no pre-tokenizer)"
        )
    unk = model.get("unk_token")

    def type_of(token: str) -> int:
        if token == unk:
            return _TOKEN_UNKNOWN
        return _TOKEN_BYTE if _BYTE_TOKEN.fullmatch(token) else _TOKEN_NORMAL

    tokens, types = _token_table(state, config, where, type_of)
    merges = _merge_list(model)
    score = {}
    for rank, merge in enumerate(merges):
        score.setdefault(merge.replace(" ", "", 1), -float(rank + 1))
    unranked = -float(len(merges) + 1)  # pieces no merge makes (characters, bytes, specials)
    return [
        ("tokenizer.ggml.model", "llama", "STRING"),
        ("tokenizer.ggml.pre", "default", "STRING"),
        ("tokenizer.ggml.tokens", tokens, "array:STRING"),
        ("tokenizer.ggml.scores", [score.get(t, unranked) for t in tokens], "array:FLOAT32"),
        ("tokenizer.ggml.token_type", types, "array:INT32"),
        ("tokenizer.ggml.add_space_prefix", kinds[0] == "Prepend", "BOOL"),
    ]


def _special_token_keys(tokenizer: Tokenizer, config: ModelConfig):
    keys: list[tuple[str, object, str]] = []
    for role, fallback in (("bos", config.bos_token_id), ("eos", config.eos_token_id)):
        index = tokenizer.token_id(getattr(tokenizer, f"{role}_token"))
        index = index if index is not None else fallback
        if isinstance(index, list):
            index = index[0]
        if index is not None:
            keys.append((f"tokenizer.ggml.{role}_token_id", int(index), "UINT32"))
    for role, key in (("unk", "unknown"), ("pad", "padding")):
        index = tokenizer.token_id(getattr(tokenizer, f"{role}_token"))
        if index is not None:
            keys.append((f"tokenizer.ggml.{key}_token_id", int(index), "UINT32"))
    with_specials = tokenizer.backend.encode("a").ids
    without = tokenizer.backend.encode("a", add_special_tokens=False).ids
    added_front = len(with_specials) > len(without) and with_specials[0] == tokenizer.bos_token_id
    added_back = len(with_specials) > len(without) and with_specials[-1] == tokenizer.eos_token_id
    keys.append(("tokenizer.ggml.add_bos_token", bool(added_front), "BOOL"))
    keys.append(("tokenizer.ggml.add_eos_token", bool(added_back), "BOOL"))
    if tokenizer.chat_template:
        keys.append(("tokenizer.chat_template", tokenizer.chat_template, "STRING"))
    return keys
