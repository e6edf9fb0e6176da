"""Every NF4 op refuses bad input at the dispatch boundary, on every path (reference, host, Triton
under TRITON_INTERPRET=1), with one ValueError naming the op and the shapes; before these checks the
Triton matmul returned an (m, 37) result for an (m, 64) input against a (37, 100) weight."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import ops
from backends.torch_backend.dispatch import force_path
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import TRITON_INTERPRETER_READY

TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None
        or not TRITON_INTERPRETER_READY
        or os.environ.get("TRITON_INTERPRET") != "1",
        reason="the Triton path on CPU tensors needs triton and TRITON_INTERPRET=1",
    ),
)
PATHS = ["reference", "auto", TRITON]  # auto on CPU tensors: the host (numpy) path


@pytest.fixture(scope="module")
def weight() -> NF4Weight:
    w = np.random.default_rng(0).standard_normal((37, 100)).astype(np.float32)
    return NF4Weight.from_nf4(nf4core.quantize(w, blocksize=64, double_quant=True))


def _corrupt(w: NF4Weight, **fields) -> NF4Weight:
    """A weight whose fields were changed after its own checks ran (as a swapped buffer would)."""
    bad = NF4Weight(**{f: getattr(w, f) for f in w.__dataclass_fields__})
    for name, value in fields.items():
        object.__setattr__(bad, name, value)
    return bad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [3, 40])  # the GEMV and the tiled matmul kernels
def test_input_width_must_match_the_weight(weight, path, rows):
    x = torch.randn(rows, 64)
    with force_path(path), pytest.raises(ValueError) as info:
        ops.linear(x, weight)
    assert str(info.value) == (
        f"nf4 linear: input ({rows}, 64) does not fit weight (37, 100) (its last dim must be 100)"
    )
    with force_path(path), pytest.raises(ValueError, match=r"nf4 linear_grad_input: input"):
        ops.linear_grad_input(torch.randn(rows, 100), weight)


@pytest.mark.parametrize("path", PATHS)
def test_valid_calls_still_run(weight, path):
    x = torch.randn(3, 100)
    with force_path(path):
        y = ops.linear(x, weight)
        g = ops.linear_grad_input(torch.randn(2, 37), weight)
    assert y.shape == (3, 37) and g.shape == (2, 100)


@pytest.mark.parametrize("path", PATHS)
def test_packed_codes_must_be_uint8(weight, path):
    bad = _corrupt(weight, packed=weight.packed.to(torch.int32))
    x = torch.randn(3, 100)
    for call in (
        lambda: ops.linear(x, bad),
        lambda: ops.dequantize(bad),
        lambda: ops.block_absmax(bad),
    ):
        with (
            force_path(path),
            pytest.raises(ValueError, match="packed codes must be 1-D uint8, got int32"),
        ):
            call()


@pytest.mark.parametrize("path", PATHS)
def test_code_table_and_scales_dtypes(weight, path):
    x = torch.randn(3, 100)
    with force_path(path), pytest.raises(ValueError, match="code table must be 16 float32"):
        ops.linear(x, _corrupt(weight, quant_map=weight.quant_map.double()))
    with force_path(path), pytest.raises(ValueError, match="block scales must be uint8"):
        ops.linear(x, _corrupt(weight, nested_codes=weight.nested_codes.int()))


@pytest.mark.parametrize("path", PATHS)
def test_input_dtype_and_result_dtype(weight, path):
    with (
        force_path(path),
        pytest.raises(ValueError, match="input must be float32.*got int64"),
    ):
        ops.linear(torch.ones(3, 100, dtype=torch.long), weight)
    with force_path(path), pytest.raises(ValueError, match="nf4 dequantize: the result dtype"):
        ops.dequantize(weight, torch.int32)
    with force_path(path), pytest.raises(ValueError, match="at least 1 dim"):
        ops.linear(torch.tensor(1.0), weight)


def test_input_and_weight_devices_must_agree(weight):
    meta = torch.empty(3, 100, device="meta")
    with pytest.raises(ValueError, match="nf4 linear: the input is on meta, the weight on cpu"):
        ops.linear(meta, weight)
