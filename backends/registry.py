"""Which backend, device and compute dtype a run uses, and why.

Order when nothing is asked for: an NVIDIA GPU -> torch on CUDA; an Apple GPU -> mlx on Metal; otherwise
the CPU, with torch if it is installed, else mlx. `--backend`/`--device`/`--compute-dtype` (or the
NF4_BACKEND / NF4_DEVICE / NF4_COMPUTE_DTYPE environment variables) override. Probing happens when
`select_backend` is called, never at import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nf4core.dtypes import FLOAT_DTYPES

from .engine import BaseWeights, Engine, LoRASettings, TrainSettings

if TYPE_CHECKING:
    import nf4core

BACKENDS = ("torch", "mlx")
COMPUTE_DTYPES = tuple(FLOAT_DTYPES)  # float32, float16, bfloat16
EXTRA_OF = {"torch": "torch", "mlx": "mlx"}
# which kernels a backend's ops run: auto, reference, or its own ("triton" on torch, "metal" on mlx)
KERNELS_ENV = "NF4_KERNELS"
# deprecated: the names each backend read before NF4_KERNELS (still read when it is unset)
OLD_KERNELS_ENV = {"torch": "NF4_QLORA_KERNELS", "mlx": "NF4_MLX_KERNELS"}
# the engine class of each backend, imported only when that backend is chosen
ENGINES = {
    "torch": ("backends.torch_backend.engine", "TorchEngine"),
    "mlx": ("backends.mlx_backend.engine", "MLXEngine"),
}


class BackendUnavailable(RuntimeError):
    """The requested backend or device cannot run here; the message says what to install or change."""


class SystemProbe:
    """What this machine has. Imports torch/mlx only when asked."""

    def has_package(self, name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    def cuda_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def cuda_bf16(self) -> bool:
        import torch

        return torch.cuda.is_bf16_supported()

    def metal_available(self) -> bool:
        import mlx.core as mx

        return mx.metal.is_available()


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "torch" | "mlx"
    device: str  # "cuda", "cuda:1", "metal" or "cpu"
    compute_dtype: str  # "bfloat16", "float16" or "float32"
    reason: str

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}"
            )

    def describe(self) -> str:
        return f"backend {self.backend}, device {self.device}, compute {self.compute_dtype} ({self.reason})"


def kernels_from_env(
    backend: str, paths: tuple[str, ...], env: Mapping[str, str] | None = None
) -> str:
    """The kernel path the environment asks `backend` for (NF4_KERNELS, else the backend's
    deprecated name, else "auto"); ValueError naming the variable for a value not in `paths`."""
    env = os.environ if env is None else env
    name = KERNELS_ENV if KERNELS_ENV in env else OLD_KERNELS_ENV[backend]
    path = env.get(name, "auto")
    if path not in paths:
        raise ValueError(f"{name} must be one of {paths}, got {path!r}")
    return path


def select_backend(
    backend: str | None = None,
    device: str | None = None,
    compute_dtype: str | None = None,
    env: Mapping[str, str] | None = None,
    probe: SystemProbe | None = None,
) -> BackendChoice:
    """Pick backend, device and compute dtype; explicit arguments beat the environment, which beats
    detection. Raises BackendUnavailable with the fix when a request cannot be met."""
    env = os.environ if env is None else env
    probe = probe or SystemProbe()
    backend = backend or env.get("NF4_BACKEND") or None
    device = device or env.get("NF4_DEVICE") or None
    compute_dtype = compute_dtype or env.get("NF4_COMPUTE_DTYPE") or None
    if backend is not None and backend not in BACKENDS:
        raise BackendUnavailable(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    installed = [name for name in BACKENDS if probe.has_package(name)]
    if backend is not None and backend not in installed:
        raise BackendUnavailable(
            f"backend {backend!r} is not installed: pip install -e '.[{EXTRA_OF[backend]}]'"
        )
    if not installed:
        raise BackendUnavailable(
            "no backend is installed: pip install -e '.[torch]' (NVIDIA or any CPU) "
            "or -e '.[mlx]' (Apple silicon)"
        )
    backend, device, reason = _backend_and_device(backend, device, installed, probe)
    if compute_dtype is None:
        compute_dtype, why = _default_compute_dtype(backend, device, probe)
        reason = f"{reason}; {why}"
    else:
        reason = f"{reason}; compute dtype as requested"
    return BackendChoice(backend, device, compute_dtype, reason)


def _backend_and_device(backend, device, installed, probe) -> tuple[str, str, str]:
    if device is not None:
        kind = device.split(":")[0]
        if kind not in ("cuda", "metal", "cpu"):
            raise BackendUnavailable(f"unknown device {device!r}; use cuda, cuda:N, metal or cpu")
        if kind == "cuda":
            if backend == "mlx":
                raise BackendUnavailable("the mlx backend has no CUDA device; use --backend torch")
            if "torch" not in installed or not probe.cuda_available():
                raise BackendUnavailable(f"device {device!r} asked for, but no CUDA GPU is usable")
            return "torch", device, "device as requested"
        if kind == "metal":
            if backend == "torch":
                raise BackendUnavailable(
                    "the torch backend does not run on Metal here; use --backend mlx"
                )
            if "mlx" not in installed or not probe.metal_available():
                raise BackendUnavailable("device 'metal' asked for, but no Apple GPU is usable")
            return "mlx", "metal", "device as requested"
        chosen = backend or ("torch" if "torch" in installed else "mlx")
        return chosen, "cpu", "device as requested"
    if backend in (None, "torch") and "torch" in installed and probe.cuda_available():
        return "torch", "cuda", "an NVIDIA GPU is available"
    if backend in (None, "mlx") and "mlx" in installed and probe.metal_available():
        return "mlx", "metal", "an Apple GPU is available"
    if backend is not None:
        return backend, "cpu", f"backend {backend} as requested; no GPU for it here"
    chosen = "torch" if "torch" in installed else "mlx"
    return chosen, "cpu", f"no GPU found; {chosen} is installed"


def _default_compute_dtype(backend, device, probe) -> tuple[str, str]:
    if device.startswith("cuda"):
        if probe.cuda_bf16():
            return "bfloat16", "BF16 on this GPU"
        return "float16", "this GPU has no BF16"
    if device == "metal":
        return "bfloat16", "BF16 on the Apple GPU"
    return "float32", "FP32 on the CPU (BF16 matmul is several times slower on most CPUs)"


def build_engine(
    choice: BackendChoice,
    source: nf4core.ModelSource,
    lora: LoRASettings | None,
    train: TrainSettings | None = None,
    lr: float = 1e-4,
    base: BaseWeights | None = None,
) -> Engine:
    """The chosen backend's model built from `source` (NF4 base), with adapters when `lora` is given
    (always, to train), ready to train with `train` settings."""
    module, name = ENGINES[choice.backend]
    cls = getattr(importlib.import_module(module), name)
    return cls(choice, source, lora, train, lr, base or BaseWeights())
