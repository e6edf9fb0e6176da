"""LoRA adapters in PEFT's convention: y = base(x) + scale * dropout(x) A^T B^T, scale = alpha / r;
DoRA adds PEFT's `lora_magnitude_vector` (see torch_backend/lora.py's LoRALinear for the formula)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from nf4core import lora_init

from ..engine import LoRASettings
from ..peft_adapter import MAGNITUDE, peft_key
from ._mlx import mx, mx_dtype, nn
from .nf4_linear import NF4Linear


def _shape_of(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, NF4Linear):
        return base.out_features, base.in_features
    if isinstance(base, nn.Linear):
        return tuple(base.weight.shape)
    raise TypeError(f"LoRA wraps NF4Linear or nn.Linear, got {type(base).__name__}")


def base_weight(base: nn.Module) -> mx.array:
    """The frozen (out, in) weight of an NF4Linear (dequantized) or nn.Linear, float32."""
    if isinstance(base, NF4Linear):
        return base.dequantized_weight(mx.float32)
    return base.weight.astype(mx.float32)


def _row_norm(w: mx.array, a: mx.array, b: mx.array, scale: float) -> mx.array:
    """||W + scale * B A|| per output row (out,), float32."""
    v = w + scale * (b.astype(mx.float32) @ a.astype(mx.float32))
    return mx.sqrt(mx.sum(mx.square(v), axis=1))


class LoRALinear(nn.Module):
    """A frozen base linear plus trainable adapters `lora_A` (r, in) and `lora_B` (out, r), and
    with DoRA the trainable `lora_magnitude_vector` (out,); the row norm it divides by is computed
    from the dequantized base on each call and held constant for the gradient (as peft does)."""

    def __init__(
        self,
        base: nn.Module,
        lora_A: mx.array,
        lora_B: mx.array,
        scale: float,
        dropout: float = 0.0,
        magnitude: mx.array | None = None,
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
        if magnitude is not None:
            if magnitude.shape != (out_features,):
                raise ValueError(
                    f"DoRA magnitude {magnitude.shape} does not fit {out_features} outputs"
                )
            self.lora_magnitude_vector = magnitude
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
        cls, base: nn.Module, name: str, settings: LoRASettings, adapter_dtype: str = "float32"
    ) -> LoRALinear:
        """Wrap `base`; A from nf4core's seeded init for module `name`, B zero (PEFT's default)."""
        out_features, in_features = _shape_of(base)
        a, b = lora_init(name, in_features, out_features, settings.r, settings.seed)
        cast = mx_dtype(adapter_dtype)
        a, b = mx.array(a), mx.array(b)
        magnitude = None
        if settings.use_dora:  # m starts as ||W + scale * B A||_row: the model starts unchanged
            magnitude = _row_norm(base_weight(base), a, b, settings.scale).astype(cast)
        return cls(
            base, a.astype(cast), b.astype(cast), settings.scale, settings.dropout, magnitude
        )

    def __call__(self, x: mx.array) -> mx.array:  # (..., in) -> (..., out)
        y = self.base(x)
        dropped = self._dropout(x)
        z = (dropped @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        lora = (self.scale * z).astype(y.dtype)
        if MAGNITUDE not in self:
            return y + lora
        norm = mx.stop_gradient(
            _row_norm(base_weight(self.base), self.lora_A, self.lora_B, self.scale)
        )
        rescale = (self.lora_magnitude_vector / norm).astype(y.dtype)
        bias = self.base.bias.astype(y.dtype) if "bias" in self.base else None
        base_only = y if dropped is x else self.base(dropped)  # dropout: the dropped input's term
        if bias is not None:
            base_only = base_only - bias
        return y + (rescale - 1) * base_only + rescale * lora


def apply_lora(
    model: nn.Module, settings: LoRASettings, adapter_dtype: str = "float32"
) -> list[str]:
    """Freeze `model` and wrap every targeted linear in a LoRALinear; returns the wrapped names.

    The module's qualified name (e.g. "model.layers.0.self_attn.q_proj") seeds its A, so adapters are
    identical on every backend that names modules like Hugging Face. The optimizer keeps float32
    masters whatever `adapter_dtype` the adapters are stored in.
    """
    mx_dtype(adapter_dtype)
    model.freeze()
    wrapped = []
    for path, module in model.named_modules():
        if not settings.adapts(path) or not isinstance(module, (NF4Linear, nn.Linear)):
            continue
        parent = model
        parts = path.split(".")
        for part in parts[:-1]:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        setattr(parent, parts[-1], LoRALinear.from_base(module, path, settings, adapter_dtype))
        wrapped.append(path)
    if not wrapped:
        raise ValueError(f"no linear module matches the LoRA targets {settings.targets}")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """Adapter weights (float32) under PEFT's key names ("base_model.model.<m>.lora_A.weight", and
    with DoRA "base_model.model.<m>.lora_magnitude_vector")."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for key in ("lora_A", "lora_B", MAGNITUDE):
                if key in module:
                    value = np.array(module[key].astype(mx.float32))
                    out[peft_key(f"{path}.{key}")] = value
    return out


def load_lora_state_dict(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy adapters saved by `lora_state_dict` (or PEFT) into the model's LoRALinear modules, each
    cast to the dtype it is held in. KeyError names an adapter the state lacks."""
    missing = sorted(set(lora_state_dict(model)) - set(tensors))
    if missing:
        raise KeyError(f"adapter state lacks {len(missing)} keys, e.g. {missing[0]}")
    updates = []
    for path, value in tree_flatten(model.trainable_parameters()):
        array = np.asarray(tensors[peft_key(path)], np.float32)
        updates.append((path, mx.array(array).astype(value.dtype)))
    model.update(tree_unflatten(updates))
    mx.eval(model.parameters())
