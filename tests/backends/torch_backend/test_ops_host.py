import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import ops, ops_host, ops_reference
from backends.torch_backend.dispatch import force_path
from backends.torch_backend.nf4_weight import NF4Weight


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_equals_nf4core_and_the_torch_reference(dtype, blocksize, double_quant):
    w = np.random.default_rng(blocksize).standard_normal((37, 101)).astype(np.float32)
    t = nf4core.quantize(w, blocksize, double_quant)
    weight = NF4Weight.from_nf4(t)
    got = ops.dequantize(weight, dtype)
    assert np.array_equal(bits(got), bits(ops_reference.dequantize(weight, dtype)))
    expected = torch.from_numpy(nf4core.dequantize(t)).to(dtype)
    assert np.array_equal(bits(got), bits(expected))


def test_dispatch_takes_the_host_path_on_cpu_unless_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(ops_host, "dequantize", lambda w, dtype=torch.float32: calls.append("host"))
    weight = NF4Weight.from_nf4(nf4core.quantize(np.ones((4, 64), np.float32)))
    ops.dequantize(weight)
    with force_path("reference"):
        ops.dequantize(weight)
    assert calls == ["host"]
