import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nf4core

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def bits(a) -> np.ndarray:
    """float32 data as uint32 for bit-exact comparison."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def quantized(rng, shape, blocksize=64, double_quant=True, scale=1.0):
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    return w, nf4core.quantize(w, blocksize=blocksize, double_quant=double_quant)


# Set up by tests/conftest.py before anything imports triton.
from tests.conftest import TRITON_INTERPRETER_READY  # noqa: E402, F401
