"""The launch configurations a GPU gets (launch_config.py), run under TRITON_INTERPRET=1 on CPU
tensors: the real tile sizes (not the 16x16x16 test tiles) for every row class the dispatcher uses
(GEMV, short tile, tall tile), the K loop in both of its forms, and the run-time fallback after an
OutOfResources (to a smaller tile, then to the reference path) with one warning line."""

import os
import warnings

import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import launch_config, ops_triton
from backends.torch_backend.kernels import load_kernel_module
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import TRITON_INTERPRETER_READY, quantized

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not TRITON_INTERPRETER_READY or os.environ.get("TRITON_INTERPRET") != "1",
    reason="kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported",
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |want|
N, K = 70, 300  # above BN = 64 and BK = 256 / BR = 64, so edges and several K steps are exercised
GPU = (8, 9)  # an RTX 40xx: the 99 KB shared-memory class


@pytest.fixture(scope="module")
def weight():
    _, t = quantized(np.random.default_rng(11), (N, K), 64, True)
    return t, NF4Weight.from_nf4(t)


@pytest.fixture
def on_gpu_tiles(monkeypatch):
    monkeypatch.setattr(ops_triton, "_capability", lambda t: GPU)


def _check(got, want, dtype):
    err = (got.float() - want).abs().max().item()
    assert got.dtype == dtype and err <= TOLERANCE[dtype] * want.abs().max().item(), err


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("m", [1, 8, 9, 16, 17, 70])
def test_gpu_tiles_for_every_row_class(weight, on_gpu_tiles, dtype, m):
    t, w = weight
    w_c = torch.from_numpy(nf4core.dequantize(t)).to(dtype).float()  # (N, K)
    x = torch.randn(m, K).to(dtype)
    g = torch.randn(m, N).to(dtype)
    _check(ops_triton.linear(x, w), x.float() @ w_c.T, dtype)  # GEMV up to 8 rows, then matmul
    _check(ops_triton.linear_grad_input(g, w), g.float() @ w_c, dtype)


def test_gpu_tiles_are_the_dispatchers(weight, on_gpu_tiles, monkeypatch):
    """The interpreter really gets the GPU's tiles (not the test tiles)."""
    seen = []
    original = ops_triton._launch
    monkeypatch.setattr(ops_triton, "_launch", lambda *a: seen.append(a[4][0]) or original(*a))
    _, w = weight
    ops_triton.linear(torch.randn(17, K, dtype=torch.bfloat16), w)
    ops_triton.linear(torch.randn(2, K), w)
    assert seen == [launch_config.matmul_configs(GPU, 2, 17)[0], launch_config.gemv_configs(GPU)[0]]
    assert seen[0].BM == 64 and seen[1].BK == 256


def test_for_loop_and_while_loop_agree(weight, monkeypatch):
    """Compiled kernels use the for loop, the interpreter the while loop: same bits (Triton >= 3.7's
    interpreter runs both; 3.6's only the while loop)."""
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("Triton <= 3.6's interpreter cannot run range() over a runtime bound")
    _, w = weight
    x = torch.randn(20, K, dtype=torch.bfloat16)
    while_loop = (ops_triton.linear(x, w), ops_triton.linear(x[:3], w))
    monkeypatch.setattr(ops_triton, "_while_loop", lambda: False)
    for_loop = (ops_triton.linear(x, w), ops_triton.linear(x[:3], w))
    assert all(torch.equal(a, b) for a, b in zip(while_loop, for_loop))


class _RunsOutOfResources:
    """A kernel stand-in that raises OutOfResources for the tile sizes in `too_big` (as a GPU does
    at launch) and runs the real kernel for the others."""

    def __init__(self, kernel, too_big):
        self.kernel, self.too_big, self.tried = kernel, too_big, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            from triton.runtime.errors import OutOfResources

            self.tried.append(kw["BM"])
            if kw["BM"] in self.too_big:
                raise OutOfResources(114688, 101376, "shared memory")
            return self.kernel[grid](*args, **kw)

        return launch


@pytest.fixture
def fresh_fallback_state(monkeypatch):
    monkeypatch.setattr(ops_triton, "_does_not_fit", set())
    monkeypatch.setattr(ops_triton, "_warned", set())


def test_out_of_resources_falls_back_to_a_smaller_tile(
    weight, on_gpu_tiles, fresh_fallback_state, monkeypatch
):
    t, w = weight
    kernels = load_kernel_module("nf4_kernels.py")
    stand_in = _RunsOutOfResources(kernels.nf4_matmul_kernel, too_big={64})
    monkeypatch.setattr(kernels, "nf4_matmul_kernel", stand_in)
    x = torch.randn(33, K, dtype=torch.bfloat16)
    want = x.float() @ torch.from_numpy(nf4core.dequantize(t)).to(torch.bfloat16).float().T
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check(ops_triton.linear(x, w), want, torch.bfloat16)
        _check(ops_triton.linear(x, w), want, torch.bfloat16)  # remembered: no second attempt
    assert stand_in.tried == [64, 16, 16] and launch_config.FALLBACK_MATMUL.BM == 16
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "does not fit this GPU; using MatmulConfig(BM=16" in str(caught[0].message)


def test_out_of_resources_everywhere_falls_back_to_the_reference(
    weight, on_gpu_tiles, fresh_fallback_state, monkeypatch
):
    t, w = weight
    kernels = load_kernel_module("nf4_kernels.py")
    stand_in = _RunsOutOfResources(kernels.nf4_matmul_kernel, too_big={16, 64})
    monkeypatch.setattr(kernels, "nf4_matmul_kernel", stand_in)
    g = torch.randn(33, N, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ops_triton.linear_grad_input(g, w)
    want = g @ torch.from_numpy(nf4core.dequantize(t)).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "using the torch reference path" in str(caught[0].message)
