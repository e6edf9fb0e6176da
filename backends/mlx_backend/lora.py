"""LoRA adapters in PEFT's convention: y = base(x) + scale * dropout(x) A^T B^T, scale = alpha / r."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nf4core import lora_init
from nf4core.model_config import LINEAR_NAMES

from ._mlx import mx, mx_dtype, nn
from .nf4_linear import NF4Linear

DEFAULT_TARGETS = LINEAR_NAMES


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyper-parameters (PEFT's names). `use_rslora` scales by alpha / sqrt(r)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    dtype: str = "float32"  # adapter storage dtype; the optimizer keeps float32 masters

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty: LoRA would train nothing")
        mx_dtype(self.dtype)
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _shape_of(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, NF4Linear):
        return base.out_features, base.in_features
    if isinstance(base, nn.Linear):
        return tuple(base.weight.shape)
    raise TypeError(f"LoRA wraps NF4Linear or nn.Linear, got {type(base).__name__}")


class LoRALinear(nn.Module):
    """A frozen base linear plus trainable adapters `lora_A` (r, in) and `lora_B` (out, r)."""

    def __init__(
        self,
        base: nn.Module,
        lora_A: mx.array,
        lora_B: mx.array,
        scale: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_features, in_features = _shape_of(base)
        r = lora_A.shape[0]
        if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
            raise ValueError(
                f"adapter shapes {lora_A.shape}, {lora_B.shape} do not fit a "
                f"({out_features}, {in_features}) layer"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        base.freeze()
        self.base = base
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.scale = scale
        self.dropout_p = dropout
        self.set_dropout_key(None)

    def set_dropout_key(self, key: mx.array | None) -> None:
        """Draw the dropout mask from `key` (uint32 (2,)) instead of the global generator.

        Note: gradient checkpointing recomputes a block in the backward pass; a mask drawn from the
        global generator would differ the second time, so the model hands each block a key.
        """
        object.__setattr__(self, "_dropout_key", key)  # a plain attribute, never a parameter

    def _dropout(self, x: mx.array) -> mx.array:
        if not self.training or self.dropout_p == 0.0:
            return x
        keep = mx.random.bernoulli(1.0 - self.dropout_p, x.shape, key=self._dropout_key)
        return x * keep.astype(x.dtype) * (1.0 / (1.0 - self.dropout_p))

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        name: str = "",
        seed: int = 0,
        dtype: str = "float32",
    ) -> LoRALinear:
        """Wrap `base`; A from nf4core's seeded init for module `name`, B zero (PEFT's default)."""
        config = LoRAConfig(
            r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, seed=seed, dtype=dtype
        )
        out_features, in_features = _shape_of(base)
        a, b = lora_init(name, in_features, out_features, r, seed)
        cast = mx_dtype(dtype)
        return cls(base, mx.array(a).astype(cast), mx.array(b).astype(cast), config.scale, dropout)

    def __call__(self, x: mx.array) -> mx.array:  # (..., in) -> (..., out)
        y = self.base(x)
        z = (self._dropout(x) @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def delta_weight(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """scale * B @ A, (out, in)."""
        return (
            self.scale * (self.lora_B.astype(mx.float32) @ self.lora_A.astype(mx.float32))
        ).astype(dtype)

    def merge(self, dtype: mx.Dtype = mx.float32) -> nn.Linear:
        """A dense nn.Linear holding W + scale * B A (the base dequantized in float32 first)."""
        if isinstance(self.base, NF4Linear):
            weight = self.base.dequantized_weight(mx.float32)
        else:
            weight = self.base.weight.astype(mx.float32)
        weight = (weight + self.delta_weight(mx.float32)).astype(dtype)
        out_features, in_features = weight.shape
        has_bias = "bias" in self.base
        merged = nn.Linear(in_features, out_features, bias=has_bias)
        merged.weight = weight
        if has_bias:
            merged.bias = self.base.bias.astype(dtype)
        return merged


def apply_lora(model: nn.Module, config: LoRAConfig, prefix: str = "") -> list[str]:
    """Freeze `model` and wrap every targeted linear (matched by its last name) in a LoRALinear.

    Adapters are named by their Hugging Face module path (e.g. model.layers.0.self_attn.q_proj), which
    seeds their init; returns the names wrapped.
    """
    model.freeze()
    wrapped = []
    for path, module in model.named_modules():
        last = path.rsplit(".", 1)[-1]
        if last not in config.target_modules or not isinstance(module, (NF4Linear, nn.Linear)):
            continue
        parent = model
        parts = path.split(".")
        for part in parts[:-1]:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        name = f"{prefix}.{path}" if prefix else path
        lora = LoRALinear.from_base(
            module,
            config.r,
            config.alpha,
            config.dropout,
            config.use_rslora,
            name,
            config.seed,
            config.dtype,
        )
        setattr(parent, parts[-1], lora)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no module matched target_modules {config.target_modules}")
    return wrapped


def lora_state_dict(model: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Adapter weights under PEFT's keys: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            name = f"{prefix}.{path}" if prefix else path
            for key in ("lora_A", "lora_B"):
                array = module[key].astype(mx.float32)
                out[f"base_model.model.{name}.{key}.weight"] = np.array(array)
    return out
