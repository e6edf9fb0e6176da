"""`LoRALinear` in PEFT's convention, and helpers to add and export adapters in a model (merging is
`backends/merge.py`, one definition for both backends)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nf4core

from ..engine import LoRASettings
from ..peft_adapter import PEFT_PREFIX
from .nf4_linear import NF4Linear


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ A^T @ B^T with A (r, in) and B (out, r) trainable.

    `lora_A` and `lora_B` are bias-free nn.Linear modules, so state-dict keys are PEFT's
    (`<m>.lora_A.weight`, `<m>.lora_B.weight`). Adapters are held in `adapter_dtype` and cast to the
    input's dtype in forward; with float32 adapters that is the FP32 master copy itself.
    """

    def __init__(
        self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        rank, in_features = a.shape
        if (base.in_features, base.out_features) != (in_features, b.shape[0]) or b.shape[1] != rank:
            raise ValueError(
                f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                f"base of {base.in_features} -> {base.out_features}"
            )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=a.device, dtype=a.dtype)
        self.lora_B = nn.Linear(rank, b.shape[0], bias=False, device=b.device, dtype=b.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = in_features, b.shape[0]

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        name: str,
        settings: LoRASettings,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> LoRALinear:
        """Wrap `base` (NF4Linear or nn.Linear) with adapters initialised by nf4core.lora_init(name)."""
        a, b = nf4core.lora_init(
            name, base.in_features, base.out_features, settings.r, settings.seed
        )
        device = base.bias.device if getattr(base, "bias", None) is not None else _device_of(base)
        to = dict(device=device, dtype=adapter_dtype)
        return cls(
            base,
            torch.from_numpy(a).to(**to),
            torch.from_numpy(b).to(**to),
            settings.scale,
            settings.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base(x)
        a = self.lora_A.weight.to(x.dtype)  # (r, in)
        b = self.lora_B.weight.to(x.dtype)  # (out, r)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.buffers()) + list(module.parameters()):
        return t.device
    return torch.device("cpu")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_lora(
    model: nn.Module, settings: LoRASettings, adapter_dtype: torch.dtype = torch.float32
) -> list[str]:
    """Freeze `model` and wrap every targeted linear in a LoRALinear; returns the wrapped names.

    The module's qualified name (e.g. "model.layers.0.self_attn.q_proj") seeds its A, so adapters are
    identical on every backend that names modules like Hugging Face.
    """
    model.requires_grad_(False)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (NF4Linear, nn.Linear)) and settings.adapts(n)
    ]
    if not names:
        raise ValueError(f"no linear module matches the LoRA targets {settings.targets}")
    for name in names:
        _set_submodule(
            model,
            name,
            LoRALinear.from_base(model.get_submodule(name), name, settings, adapter_dtype),
        )
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names ("base_model.model.<m>.lora_A.weight")."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor | np.ndarray]) -> None:
    """Copy adapters saved by `lora_state_dict` (or PEFT) into the model's LoRALinear modules."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"adapter state lacks {len(missing)} keys, e.g. {missing[0]}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(
                torch.as_tensor(
                    np.asarray(state[key])
                    if not isinstance(state[key], torch.Tensor)
                    else state[key]
                )
            )
