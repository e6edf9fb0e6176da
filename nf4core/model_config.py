"""`ModelConfig`: the architecture of a Llama-family model, whatever file it came from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig default
# The linear layers of a Llama-family block (HF module names): what NF4 quantizes and LoRA targets.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama).

    Field names follow Hugging Face's config.json. `attention_bias` is True for Qwen2 (q/k/v biases)
    and, for Llama, adds q/k/v/o biases; `mlp_bias` (Llama only) adds gate/up/down biases.
    `sliding_window` (Mistral only) limits each query to the last `sliding_window` positions.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None becomes hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query at i sees keys j with i - window < j <= i
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # config.json keys we keep but do not use
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        window = self.sliding_window
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise ValueError(f"sliding_window must be a positive int or None, got {window!r}")
            if self.architecture != "mistral":
                raise ValueError(
                    f"sliding_window is supported for mistral only, not {self.architecture!r}"
                )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    "hidden_size must divide by num_attention_heads when head_dim is unset"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._check_other_fields()

    def _check_other_fields(self) -> None:
        """Types and ranges of the remaining fields: a wrong type is refused, never reinterpreted
        (the string "false" is not a true tie_word_embeddings)."""
        if not _positive_int(self.head_dim) or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {self.head_dim!r}")
        if not _positive_int(self.max_position_embeddings):
            raise ValueError(
                f"max_position_embeddings must be a positive int, got "
                f"{self.max_position_embeddings!r}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.bos_token_id is None or _token_id(self.bos_token_id)):
            raise ValueError(f"bos_token_id must be a token id, got {self.bos_token_id!r}")
        eos = self.eos_token_id
        if not (
            eos is None
            or _token_id(eos)
            or (isinstance(eos, list) and eos and all(map(_token_id, eos)))
        ):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
        if self.mlp_bias and self.architecture != "llama":
            raise ValueError(  # transformers' Mistral and Qwen2 MLPs have no bias
                f"mlp_bias is supported for llama only, not {self.architecture!r}"
            )
        check_rope_scaling(self.rope_scaling)
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelConfig:
        """From a Hugging Face config.json dict; ValueError names an unsupported model_type."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        known = {f for f in cls.__dataclass_fields__ if f not in ("architecture", "extra")}
        if model_type != "mistral":  # Llama has no window; Qwen2's own keys stay in `extra`
            known.discard("sliding_window")
        config = _legacy_rope_keys(config)
        values = {k: config[k] for k in known if k in config and config[k] is not None}
        values.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        if model_type == "mistral" and "sliding_window" not in config:
            values["sliding_window"] = MISTRAL_DEFAULT_WINDOW  # as transformers reads a missing key
        if model_type == "qwen2":
            values["attention_bias"] = True
            if config.get("use_sliding_window"):
                raise ValueError(
                    "Qwen2 sliding-window layers (use_sliding_window with "
                    "max_window_layers) are not supported"
                )
        check_unimplemented_options(config)
        generated = ("model_type", "architectures")  # to_hf_config writes these from `architecture`
        extra = {k: v for k, v in config.items() if k not in known and k not in generated}
        return cls(architecture=model_type, extra=extra, **values)

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers reads back to the same model."""
        fields = asdict(self)
        for internal in ("extra", "architecture", "config_version"):
            fields.pop(internal)
        if self.architecture == "qwen2":
            fields.pop("attention_bias")
        if self.architecture != "llama":  # a key in `extra` stays as it was
            fields.pop("mlp_bias")
        if self.architecture != "mistral":  # a Qwen2 `sliding_window` in `extra` stays as it was
            fields.pop("sliding_window")
        # For mistral a None window is written as null: transformers reads a missing key as 4096.
        config = {**self.extra, **fields}
        arch_class = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }[self.architecture]
        config.update(model_type=self.architecture, architectures=[arch_class])
        return config


def _legacy_rope_keys(config: dict) -> dict:
    """transformers >= 5 writes `rope_parameters` ({"rope_theta", "rope_type", ...}) instead of
    `rope_theta` and `rope_scaling`; map it back to those two fields."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return config
    config = {k: v for k, v in config.items() if k != "rope_parameters"}
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    if "rope_theta" in params and config.get("rope_theta") is None:
        config["rope_theta"] = params["rope_theta"]
    if rest.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        config["rope_scaling"] = rest
    return config


ROPE_SCALING_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: object) -> None:
    """ValueError unless `scaling` is None or a RoPE scaling both backends implement."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_FIELDS:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported "
            f"(supported: {', '.join(ROPE_SCALING_FIELDS)})"
        )
    for name in ROPE_SCALING_FIELDS[kind]:
        if not _positive_number(scaling.get(name)):
            raise ValueError(
                f"rope_scaling.{name} must be a finite number > 0, got {scaling.get(name)!r}"
            )
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise ValueError("rope_scaling: low_freq_factor and high_freq_factor must differ")


# config.json options whose other values change the model in ways we do not implement:
# field -> (what we run, the values that mean it)
_IMPLEMENTED_OPTIONS = {
    "hidden_act": ("silu", ("silu", "swish")),
    "attention_dropout": (0.0, (0, 0.0)),
    "partial_rotary_factor": (1.0, (1, 1.0)),
}


def check_unimplemented_options(config: dict) -> None:
    """ValueError naming an option of config.json whose value we do not implement."""
    for name, (implemented, accepted) in _IMPLEMENTED_OPTIONS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) != isinstance(implemented, bool) or value not in accepted:
            raise ValueError(f"{name} {value!r} is not supported (only {implemented!r})")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
