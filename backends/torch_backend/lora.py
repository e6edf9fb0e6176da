"""`LoRALinear` in PEFT's convention (LoRA, or DoRA with a magnitude vector), and helpers to add and export adapters in a model (merging is
`backends/merge.py`, one definition for both backends)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nf4core

from ..engine import LoRASettings
from ..peft_adapter import MAGNITUDE, PEFT_PREFIX
from .cpu_matmul import frozen_matmul_dtype
from .dequant_cache import active_cache
from .lora_nf4 import lora_nf4_linear
from .nf4_linear import NF4Linear


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ A^T @ B^T with A (r, in) and B (out, r) trainable.

    `lora_A` and `lora_B` are bias-free nn.Linear modules, so state-dict keys are PEFT's
    (`<m>.lora_A.weight`, `<m>.lora_B.weight`). Adapters are held in `adapter_dtype` and cast to the
    input's dtype in forward; with float32 adapters that is the FP32 master copy itself.

    DoRA (`magnitude` given, PEFT's `lora_magnitude_vector`, (out,)): the adapted weight
    V = W + scale * B A has each output row rescaled to the trainable magnitude m, so without dropout
    y = m / ||V||_row * (W x + scale * B A x) + bias. ||V||_row is computed from the dequantized base
    weight on every forward (one dequantize per layer per call) and is detached from the graph, as
    in peft (DoRA paper, section 4.3). With dropout active, as in peft, the rescaling's correction
    of the base term uses the dropped input: y = W x + bias + (m/||V|| - 1) W x' + m/||V|| scale B A x'
    with x' = dropout(x).
    """

    def __init__(
        self,
        base: nn.Module,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        dropout: float = 0.0,
        magnitude: torch.Tensor | None = None,
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
        self.lora_magnitude_vector = None
        self.output_unused = False  # set while a checkpoint recompute discards the output
        if magnitude is not None:
            if tuple(magnitude.shape) != (self.out_features,):
                raise ValueError(
                    f"DoRA magnitude {tuple(magnitude.shape)} does not fit {self.out_features} "
                    "outputs"
                )
            self.lora_magnitude_vector = nn.Parameter(magnitude.clone())

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
        a, b = torch.from_numpy(a).to(**to), torch.from_numpy(b).to(**to)
        magnitude = None
        if settings.use_dora:  # m starts as ||W + scale * B A||_row, so the model starts unchanged
            with torch.no_grad():
                magnitude = _row_norm(base_weight(base), a, b, settings.scale).to(adapter_dtype)
        return cls(base, a, b, settings.scale, settings.dropout, magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        a = self.lora_A.weight.to(x.dtype)  # (r, in)
        b = self.lora_B.weight.to(x.dtype)  # (out, r)
        if self._fusable():
            weight, bias = self.base.weight, self.base.bias
            matmul = frozen_matmul_dtype(x, x.numel() // max(x.shape[-1], 1))
            y = lora_nf4_linear(x, a, b, weight, self.scale, matmul, not self.output_unused)
            return y if bias is None else y + bias.to(y.dtype)
        y = self.base(x)
        dropped = self.dropout(x)
        lora = F.linear(F.linear(dropped, a), b) * self.scale
        if self.lora_magnitude_vector is None:
            return y + lora
        with torch.no_grad():
            norm = _row_norm(
                base_weight(self.base), self.lora_A.weight, self.lora_B.weight, self.scale
            )
        rescale = (self.lora_magnitude_vector / norm).to(x.dtype)  # (out,)
        bias = getattr(self.base, "bias", None)
        if not (self.training and isinstance(self.dropout, nn.Dropout)):
            base_only = y if bias is None else y - bias.to(y.dtype)
        else:  # the base term of the dropped input, through the base's own (NF4) matmul
            base_only = self.base(dropped)
            base_only = base_only if bias is None else base_only - bias.to(y.dtype)
        return y + (rescale - 1) * base_only + rescale * lora

    def _fusable(self) -> bool:
        """Whether forward may run as one node (lora_nf4.py): LoRA (no DoRA) on an NF4 base,
        no active dropout, autograd recording and no dequantized-weight cache in use. Not a
        sharded base (sharding.py): FSDP2 gathers its weight only inside its own forward."""
        return (
            self.lora_magnitude_vector is None
            and type(self.base) is NF4Linear
            and (isinstance(self.dropout, nn.Identity) or not self.training)
            and torch.is_grad_enabled()
            and active_cache() is None
        )


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen (out, in) weight of an NF4Linear (dequantized) or nn.Linear, float32."""
    if isinstance(base, NF4Linear):
        return base.dequantize(torch.float32)
    return base.weight.detach().float()


def _row_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + scale * B A|| per output row (out,), float32."""
    return torch.linalg.vector_norm(w + scale * (b.float() @ a.float()), dim=1)


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
    """Adapter weights under PEFT's key names ("base_model.model.<m>.lora_A.weight", and with DoRA
    "base_model.model.<m>.lora_magnitude_vector")."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach()
            if module.lora_magnitude_vector is not None:
                out[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = module.lora_magnitude_vector.detach()
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
