"""bitsandbytes (CPU) as the oracle for the NF4 format: thin wrappers that speak numpy."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels-community" notice on import
F = pytest.importorskip("bitsandbytes.functional")

from nf4core.dtypes import bfloat16  # noqa: E402


def _eager():
    # bitsandbytes wraps its pure-torch dequantize in torch.compile; compiling one graph per test
    # shape costs seconds and changes no number (an elementwise multiply and a cast).
    return (
        torch._dynamo.config.patch(disable=True)
        if hasattr(torch, "_dynamo")
        else contextlib.nullcontext()
    )


def to_torch(w: np.ndarray) -> torch.Tensor:
    if w.dtype == bfloat16:
        return torch.from_numpy(w.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(w))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(bfloat16)
    return t.detach().numpy()


def quantize(w: np.ndarray, blocksize: int, double_quant: bool):
    """bitsandbytes' (packed uint8 tensor, QuantState) for w."""
    with _eager():
        return F.quantize_4bit(
            to_torch(w), blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
        )


def state_dict(packed, quant_state, prefix: str) -> dict[str, np.ndarray]:
    """The serialized form bitsandbytes writes for a Linear4bit named `prefix`."""
    out = {f"{prefix}.weight": packed.numpy()}
    for key, value in quant_state.as_dict(packed=True).items():
        out[f"{prefix}.weight.{key}"] = value.numpy()
    return out


def quant_state_from(sd: dict[str, np.ndarray], prefix: str):
    """bitsandbytes reading a state dict (ours) back into a QuantState."""
    qs = {
        k[len(prefix) + len(".weight.") :]: torch.from_numpy(np.array(v))
        for k, v in sd.items()
        if k.startswith(f"{prefix}.weight.")
    }
    return F.QuantState.from_dict(qs, device=torch.device("cpu"))


def dequantize(packed, quant_state, dtype=None) -> np.ndarray:
    """bitsandbytes' public dequantize_4bit, as float32 numpy (or the given torch dtype)."""
    with _eager():
        out = F.dequantize_4bit(packed, quant_state)
    if dtype is not None:
        out = out.to(dtype)
    return to_numpy(out)


def cpu_kernel_is_reliable(shape: tuple[int, ...], blocksize: int) -> bool:
    """bitsandbytes 0.50's CPU C dequantize misplaces block scales when a row ends inside a block
    (e.g. shape (6, 96) at blocksize 64). Odd rows take its pure-torch path, which is right."""
    return shape[-1] % 2 == 1 or shape[-1] % blocksize == 0 or len(shape) == 1
