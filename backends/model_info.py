"""What `info` reports about a model, an adapter or a training checkpoint (no backend needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import nf4core
from nf4core.model_config import LINEAR_NAMES
from nf4core.tensor import bits_per_weight

from .checkpoint import STATE_NAME, CheckpointError, load_checkpoint
from .memory_plan import model_bytes, per_rank, training_bytes
from .peft_adapter import CONFIG_NAME, load_adapter

NF4_BITS = bits_per_weight(64)  # double-quantized, blocksize 64
LINEARS = LINEAR_NAMES


def model_info(
    path: str | Path,
    seq_len: int = 512,
    batch_size: int = 1,
    lora_r: int = 8,
    compute_bytes: int = 4,
    nproc: int | None = None,
) -> dict:
    """With `nproc`, also each rank's memory in a run of that many processes (`per_rank`)."""
    source = nf4core.open_model(path)
    c = source.config
    linear = other = 0
    for name in source.tensor_names():
        n = int(np.prod(source.tensor_shape(name)))
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if name.endswith(".weight") and module in LINEARS:
            linear += n
        else:
            other += n
    m = model_bytes(source, lora_r, compute_bytes)
    info = {
        "kind": "model",
        "path": str(path),
        "architecture": c.architecture,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "parameters": linear + other,
        "quantized_parameters": linear,
        "bits_per_weight": (linear * NF4_BITS + other * 8 * compute_bytes) / max(1, linear + other),
        "lora_parameters": m.lora_parameters,
        "lora_r": lora_r,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "memory_estimate_bytes": training_bytes(m, c, batch_size, seq_len, compute_bytes),
    }
    if nproc is not None:
        info["per_rank"] = per_rank(m, c, nproc, batch_size, seq_len, compute_bytes)
    return info


def describe(
    path: str | Path,
    seq_len: int = 512,
    batch_size: int = 1,
    lora_r: int = 8,
    nproc: int | None = None,
) -> dict:
    """Info on whatever `path` is: an adapter directory, a training checkpoint, or a model; `nproc`
    (a model only) adds each rank's memory in a run of that many processes."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file() and (p / "adapter_model.safetensors").is_file():
        _no_plan(p, nproc, "an adapter")
        a = load_adapter(p)
        return {
            "kind": "adapter",
            "path": str(p),
            "r": a.r,
            "alpha": a.alpha,
            "use_dora": a.use_dora,
            "targets": list(a.targets),
            "modules": len(a.modules()),
            "parameters": int(sum(v.size for v in a.tensors.values())),
            "base_model": a.base_model,
        }
    if (p / STATE_NAME).is_file() or (p / "checkpoints").is_dir() or (p / "latest.json").is_file():
        try:
            ck = load_checkpoint(p)
        except CheckpointError:
            if not (p / "config.json").is_file():
                raise
        else:
            _no_plan(p, nproc, "a training checkpoint")
            return {
                "kind": "checkpoint",
                "path": str(ck.path),
                "step": ck.state.step,
                "backend": ck.backend,
                "adapter_parameters": int(sum(v.size for v in ck.state.adapters.values())),
                "config": ck.config,
            }
    return model_info(p, seq_len, batch_size, lora_r, nproc=nproc)


def _no_plan(path: Path, nproc: int | None, what: str) -> None:
    if nproc is not None:
        raise ValueError(f"{path}: --nproc plans the memory of training a model; this is {what}")
