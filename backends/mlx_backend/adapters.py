"""Save and load LoRA adapters in PEFT's format (adapter_model.safetensors + adapter_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlx.utils import tree_unflatten

from ._mlx import mx, nn
from .lora import LoRAConfig, LoRALinear, lora_state_dict

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def peft_config(config: LoRAConfig, base_model: str | None = None) -> dict:
    """The adapter_config.json that PEFT's LoraConfig reads back to the same adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "target_modules": sorted(config.target_modules),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


def save_peft_adapter(
    model: nn.Module, directory: str | Path, config: LoRAConfig, base_model: str | None = None
) -> Path:
    """Write the model's adapters (float32) and config where PeftModel.from_pretrained finds them."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config(config, base_model), indent=2))
    return directory


def load_peft_weights(model: nn.Module, directory: str | Path) -> int:
    """Copy adapter weights saved by `save_peft_adapter` (or PEFT) into the model's LoRALinear
    modules; returns how many arrays were loaded. KeyError names adapters the model lacks."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    modules = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    updates = []
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.").removesuffix(".weight")
        module, _, which = name.rpartition(".")
        if module not in modules or which not in ("lora_A", "lora_B"):
            raise KeyError(f"adapter {key!r} has no LoRA module {module!r} in this model")
        current = model
        for part in module.split("."):
            current = current[int(part)] if part.isdigit() else getattr(current, part)
        dtype = current[which].dtype
        updates.append((f"{module}.{which}", mx.array(np.asarray(value)).astype(dtype)))
    model.update(tree_unflatten(updates))
    return len(updates)
