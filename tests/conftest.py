"""Session-wide test setup that must happen before any test module is imported."""

import os
import sys
from pathlib import Path


def _interpret_triton_without_gpu() -> bool:
    """Run the CUDA-path Triton kernels under Triton's interpreter (on CPU tensors) on machines
    without an NVIDIA driver. Triton reads TRITON_INTERPRET when it is imported, and some test
    dependencies (peft, bitsandbytes) import it, so this happens here, first. Returns whether the
    interpreter is in effect for this session."""
    has_nvidia = Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()
    if "triton" not in sys.modules and not has_nvidia:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") == "1"


TRITON_INTERPRETER_READY = _interpret_triton_without_gpu()
# no test reaches the Hugging Face Hub: huggingface_hub reads this when imported, and the CLI
# subprocesses inherit it
os.environ["HF_HUB_OFFLINE"] = "1"
# The suite's parity tests (torch vs mlx, vs transformers and peft, resume across backends) hold
# within float32 rounding, so the frozen matmuls of training stay FP32 here even on CPUs with native
# BF16 (backends/torch_backend/cpu_matmul.py); tests/backends/torch_backend/test_cpu_matmul.py
# covers the BF16 choice itself. NF4_CPU_MATMUL=auto in the environment runs the suite as users run.
os.environ.setdefault("NF4_CPU_MATMUL", "float32")
