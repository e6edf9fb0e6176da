"""Auto mode trusts a Triton kernel only after its self-check: a broken kernel (wrong values, or a
source that fails to compile) costs one warning and runs the reference; a correct one passes
silently and is checked once; a forced path runs as forced, unchecked. The kernels run on CPU
tensors under TRITON_INTERPRET=1, with auto mode told to take Triton on the CPU as it would on a GPU.
"""

import os
import warnings

import numpy as np
import pytest
import torch

import nf4core
from backends import kernel_self_check
from backends.torch_backend import dispatch, ops, ops_reference, ops_triton, self_check
from backends.torch_backend.dispatch import force_path
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import TRITON_INTERPRETER_READY, bits, quantized

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not TRITON_INTERPRETER_READY or os.environ.get("TRITON_INTERPRET") != "1",
    reason="kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported",
)


@pytest.fixture
def auto_takes_triton(monkeypatch):
    """Auto mode on CPU tensors picks the Triton kernels (as on a GPU); no verdict is cached."""
    monkeypatch.delenv("NF4_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))
    kernel_self_check.reset()
    yield
    kernel_self_check.reset()


@pytest.fixture(scope="module")
def weight():
    _, t = quantized(np.random.default_rng(2), (13, 70), 64, True, scale=2.0)
    return t, NF4Weight.from_nf4(t)


def _counting(monkeypatch, name, transform=None):
    """ops_triton.<name> wrapped: counts its calls, optionally changes its output."""
    calls = []
    original = getattr(ops_triton, name)

    def wrapped(*args):
        calls.append(name)
        out = original(*args)
        return transform(out) if transform else out

    monkeypatch.setattr(ops_triton, name, wrapped)
    return calls


def _off_by_half(out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out.view(-1)[5] += 0.5
    return out


def _runtime_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_a_correct_kernel_passes_silently_and_once(auto_takes_triton, weight, monkeypatch):
    t, w = weight
    calls = _counting(monkeypatch, "dequantize")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = ops.dequantize(w)
        second = ops.dequantize(w)
    assert _runtime_warnings(record) == []
    assert np.array_equal(bits(first), bits(nf4core.dequantize(t)))
    assert np.array_equal(bits(second), bits(first))
    assert len(calls) == 3  # the self-check once, then the two calls on the kernel


def test_a_wrong_dequantize_kernel_warns_once_and_the_reference_runs(
    auto_takes_triton, weight, monkeypatch
):
    t, w = weight
    calls = _counting(monkeypatch, "dequantize", _off_by_half)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [ops.dequantize(w) for _ in range(3)]
    assert _runtime_warnings(record) == [
        "triton dequantize kernel (float32) disagrees with the reference on a self-check "
        "(max |diff| 0.5); using the reference path"
    ]
    for g in got:
        assert np.array_equal(bits(g), bits(nf4core.dequantize(t)))
    assert calls == ["dequantize"]  # the self-check only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wrong_matmul_kernel_falls_back_per_op_and_dtype(
    auto_takes_triton, weight, monkeypatch, dtype
):
    """The forward kernel is 10% off (past even bfloat16's tolerance); the input-gradient kernel,
    checked on its own, stays in use."""
    _, w = weight
    _counting(monkeypatch, "linear", lambda y: y * 1.1)
    grad_calls = _counting(monkeypatch, "linear_grad_input")
    x = torch.randn(4, 70).to(dtype)
    g = torch.randn(4, 13).to(dtype)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = ops.linear(x, w)
        dx = ops.linear_grad_input(g, w)
    (message,) = _runtime_warnings(record)
    assert message.startswith(f"triton linear kernel ({str(dtype)[6:]}) disagrees")
    assert torch.equal(y, ops_reference.linear(x, w))
    tol = kernel_self_check.RELATIVE_TOLERANCE[str(dtype)[6:]]
    want = ops_reference.linear_grad_input(g.float(), w)
    assert (dx.float() - want).abs().max() <= tol * want.abs().max() * 2
    assert len(grad_calls) == 3  # two self-check sizes, then the call itself


def test_a_kernel_that_fails_to_compile_warns_once_and_the_reference_runs(
    auto_takes_triton, weight, monkeypatch
):
    t, w = weight

    def broken_source(name):
        raise SyntaxError(f"invalid syntax ({name}, line 12)")

    monkeypatch.setattr(ops_triton, "load_kernel_module", broken_source)
    x = torch.randn(2, 70)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = ops.linear(x, w)
        y2 = ops.linear(x, w)
    assert _runtime_warnings(record) == [
        "triton linear kernel (float32) failed on a self-check "
        "(SyntaxError: invalid syntax (nf4_kernels.py, line 12)); using the reference path"
    ]
    want = x @ torch.from_numpy(nf4core.dequantize(t)).T
    assert torch.equal(y, want) and torch.equal(y2, want)


@pytest.mark.parametrize("how", ["force_path", "environment"])
def test_a_forced_triton_path_runs_as_forced_without_a_self_check(
    auto_takes_triton, weight, monkeypatch, how
):
    t, w = weight
    calls = _counting(monkeypatch, "dequantize", _off_by_half)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if how == "force_path":
            with force_path("triton"):
                got = ops.dequantize(w)
        else:
            monkeypatch.setenv("NF4_KERNELS", "triton")
            got = ops.dequantize(w)
    assert _runtime_warnings(record) == []
    assert calls == ["dequantize"]  # the call itself, no self-check
    assert not np.array_equal(bits(got), bits(nf4core.dequantize(t)))  # the broken kernel ran
    assert kernel_self_check._verdicts == {}


def test_the_reference_path_never_self_checks(auto_takes_triton, weight, monkeypatch):
    _, w = weight
    calls = _counting(monkeypatch, "dequantize")
    with force_path("reference"):
        ops.dequantize(w)
    assert calls == [] and kernel_self_check._verdicts == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_real_kernels_pass_every_self_check(auto_takes_triton, dtype):
    """Control: the tolerances are not tighter than the kernels themselves need."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for op in self_check.OPS:
            assert self_check.trusted(op, dtype, torch.device("cpu"))
    assert _runtime_warnings(record) == []


def test_the_caller_autocast_does_not_reach_the_self_check(auto_takes_triton):
    """Under a bfloat16 autocast the float32 reference would round; the check turns it off."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert self_check.trusted("linear", torch.float32, torch.device("cpu"))
    assert _runtime_warnings(record) == []
