"""A GGUF file (llama.cpp, Ollama, LM Studio) read through the `gguf` package.

Tensors are dequantized to float32 one at a time and renamed to Hugging Face names. llama.cpp's
converter permutes the rows of q_proj/k_proj (weights and biases) of Llama-type models for its RoPE
kernel; `unpermute_rope_rows` restores the Hugging Face order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError
from ..model_config import MISTRAL_DEFAULT_WINDOW, ModelConfig
from ..rope import base_frequencies, llama3_factors
from .base import ModelSource, normalized

# Every weight type the `gguf` package (0.19) dequantizes: float, legacy, K-quants, IQ, ternary, FP4.
# Q8_1, Q8_K (llama.cpp's intermediate types, never stored as weights) and Q1_0 it cannot decode.
SUPPORTED_TYPES = (
    *("F32", "F16", "BF16"),
    *("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"),
    *("TQ1_0", "TQ2_0", "MXFP4", "NVFP4"),
)
_PERMUTED_ARCHS = ("llama", "mistral")  # Qwen2 uses NeoX-style RoPE: llama.cpp keeps its rows
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_DERIVED_TENSORS = ("rope_freqs.weight",)  # Llama 3 RoPE factors: checked against the config
_DEQUANT_CHUNK = 1 << 22  # elements dequantized per step
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
LLAMA3_CANDIDATES = tuple(
    {
        "rope_type": "llama3",
        "factor": f,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    for f in (8.0, 16.0, 32.0)
)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors HF does not store."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def gguf_name(hf: str) -> str:
    """The GGUF name of a Hugging Face tensor name (the inverse of `hf_name`)."""
    for gguf_tensor, name in _GLOBAL_NAMES.items():
        if name == hf:
            return gguf_tensor
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for gguf_part, name in _LAYER_NAMES.items():
            if name == parts[3]:
                return f"blk.{parts[2]}.{gguf_part}"
    raise KeyError(f"tensor {hf!r} has no GGUF name")


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's order: within each head, rows (pairs) interleaved: (h, 2, d/2) -> (h, d/2, 2)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's order back from llama.cpp's: (h, d/2, 2) -> (h, 2, d/2) within each head."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope_theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3's RoPE scaling, float32 as llama.cpp stores rope_freqs."""
    return llama3_factors(base_frequencies(rope_theta, head_dim), scaling).astype(np.float32)


def _gguf_package(path: Path):
    """The `gguf` package, imported on the first GGUF read (it is optional for everything else)."""
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(
            f"{path}: reading a GGUF file needs the `gguf` package, which is not "
            f"installed (pip install gguf)"
        ) from None
    return gguf


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


class GGUFSource(ModelSource):
    """A Llama-family GGUF file; tensors come back as float32 arrays with Hugging Face names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        gguf = _gguf_package(self.path)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except FileNotFoundError:
            raise ModelLoadError(f"{self.path}: file not found") from None
        except Exception as exc:  # the gguf package raises ValueError, struct/numpy errors, ...
            raise ModelLoadError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt?): {exc}"
            ) from None
        try:
            self.metadata = {k: f.contents() for k, f in self._reader.fields.items()}
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: metadata is unreadable: {exc}") from None
        # The reader's parsed fields (one numpy array per vocabulary entry) weigh more than the
        # values: keep the values, drop the fields.
        self._reader.fields.clear()
        self._tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
            elif t.name not in _DERIVED_TENSORS:
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name!r} is not part of a supported "
                    "Llama-family model (not supported)"
                )
        self.arch = self._get("general.architecture")
        if self.arch not in ("llama", "mistral", "qwen2"):
            raise ModelLoadError(
                f"{self.path}: architecture {self.arch!r} is not supported "
                "(supported: llama, mistral, qwen2)"
            )
        self.config = self._config()
        for t in self._tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                    f"not supported (supported: {', '.join(SUPPORTED_TYPES)})"
                )
        shapes = {
            name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()
        }
        self._check_layout(shapes, str(self.path))
        for name in self._tensors:
            if name not in self._shapes:
                raise ModelLoadError(
                    f"{self.path}: {self.arch}.block_count is "
                    f"{self.config.num_hidden_layers}, but the file holds "
                    f"{self._tensors[name].name!r}"
                )

    def _sliding_window(self) -> int | None:
        """0 means none; a Mistral file without the key gets transformers' default, like config.json."""
        default = MISTRAL_DEFAULT_WINDOW if self.arch == "mistral" else 0
        return int(self._get(f"{self.arch}.attention.sliding_window", default)) or None

    def _get(self, key: str, default: object = KeyError) -> object:
        if key not in self.metadata:
            if default is KeyError:
                raise ModelLoadError(f"{self.path}: missing metadata key {key!r}")
            return default
        return self.metadata[key]

    def _config(self) -> ModelConfig:
        try:
            return self._config_from_metadata()
        except ModelLoadError:
            raise
        except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. a string where a count goes
            raise ModelLoadError(
                f"{self.path}: metadata does not describe a model: {exc}"
            ) from None

    def _config_from_metadata(self) -> ModelConfig:
        a = self.arch
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise ModelLoadError(f"{self.path}: missing tensor 'token_embd.weight'")
        vocab = self._get(f"{a}.vocab_size", None) or int(embed.shape[1])  # shape is (in, out)
        heads = int(self._get(f"{a}.attention.head_count"))
        hidden = int(self._get(f"{a}.embedding_length"))
        head_dim = int(self._get(f"{a}.attention.key_length", hidden // heads))
        rope_theta = _f32(self._get(f"{a}.rope.freq_base", 10000.0))
        values = dict(
            architecture=a,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._get(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self._get(f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self._get(f"{a}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=_f32(self._get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=self._rope_scaling(rope_theta, head_dim),
            max_position_embeddings=int(self._get(f"{a}.context_length", 2048)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            mlp_bias="model.layers.0.mlp.gate_proj.bias" in self._tensors,
            sliding_window=self._sliding_window(),
            bos_token_id=self._get("tokenizer.ggml.bos_token_id", None),
            eos_token_id=self._get("tokenizer.ggml.eos_token_id", None),
        )
        try:
            return normalized(ModelConfig(**values))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from None

    def _rope_scaling(self, rope_theta: float, head_dim: int) -> dict | None:
        a = self.arch
        kind = self._get(f"{a}.rope.scaling.type", None)
        if kind == "linear":
            return {"rope_type": "linear", "factor": _f32(self._get(f"{a}.rope.scaling.factor"))}
        if kind not in (None, "none"):
            raise ModelLoadError(f"{self.path}: RoPE scaling {kind!r} is not supported")
        freqs = next((t for t in self._reader.tensors if t.name == "rope_freqs.weight"), None)
        if freqs is None:
            return None
        dequantize = _gguf_package(self.path).quants.dequantize
        stored = np.asarray(dequantize(freqs.data, freqs.tensor_type), np.float32)
        for candidate in LLAMA3_CANDIDATES:
            expected = llama3_rope_factors(rope_theta, head_dim, candidate)
            if stored.shape == expected.shape and np.allclose(stored, expected, rtol=1e-5):
                return dict(candidate)
        raise ModelLoadError(
            f"{self.path}: rope_freqs.weight matches no known Llama 3 RoPE scaling"
        )

    def _read(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in Hugging Face layout (q/k rows un-permuted)."""
        t = self._tensors[name]
        shape = self._shapes[name]
        values = np.empty(shape, np.float32)
        rows = t.data.reshape(shape[0] if len(shape) > 1 else 1, -1)
        flat = values.reshape(rows.shape[0], -1)
        step = max(1, _DEQUANT_CHUNK // flat.shape[1])  # rows at a time: small temporaries
        gguf = _gguf_package(self.path)
        try:
            for start in range(0, rows.shape[0], step):
                part = gguf.quants.dequantize(rows[start : start + step], t.tensor_type)
                flat[start : start + step] = part.reshape(-1, flat.shape[1])
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path}: tensor {t.name!r} cannot be decoded: {exc}"
            ) from None
        if self.arch in _PERMUTED_ARCHS:
            if ".self_attn.q_proj." in name:
                values = unpermute_rope_rows(values, self.config.num_attention_heads)
            elif ".self_attn.k_proj." in name:
                values = unpermute_rope_rows(values, self.config.num_key_value_heads)
        return values

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        try:
            return Tokenizer.from_gguf(self.path, self._get)
        except ModelLoadError:
            raise
        except Exception as exc:  # metadata of the wrong type reaches the tokenizers library
            raise ModelLoadError(
                f"{self.path}: the tokenizer metadata is unusable: {type(exc).__name__}: {exc}"
            ) from None
