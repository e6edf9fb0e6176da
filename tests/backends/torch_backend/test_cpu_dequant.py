"""The C decoder (cpu_dequant.py) against nf4core bit for bit, and the auto path's use of it."""

import functools

import numpy as np
import pytest
import torch

import nf4core
from backends import kernel_self_check
from backends.torch_backend import cpu_dequant, native_build, ops, ops_host
from backends.torch_backend.nf4_weight import NF4Weight
from backends.torch_backend.self_check import c_decoder_trusted
from tests.backends.torch_backend.conftest import BLOCKSIZES, bits, quantized


@pytest.fixture(scope="module")
def library():
    try:
        return cpu_dequant.library()
    except native_build.NativeUnavailable as exc:
        pytest.skip(f"no C decoder here: {exc}")


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_float32_bit_exact_with_nf4core(library, rng, blocksize, double_quant):
    # odd counts, partial blocks, rows across blocks, and one over a parallel slice (2^18)
    for shape in [(1,), (3, 37), (2, 2101), (300, 1000)]:
        _, t = quantized(rng, shape, blocksize, double_quant, scale=2.0)
        w = NF4Weight.from_nf4(t)
        assert np.array_equal(bits(cpu_dequant.block_absmax(w)), bits(t.block_absmax()))
        got = cpu_dequant.dequantize(w, torch.float32)
        assert got.shape == shape
        assert np.array_equal(bits(got), bits(nf4core.dequantize(t)))


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_bfloat16_rounds_like_torch(library, rng, blocksize):
    _, t = quantized(rng, (33, 257), blocksize, True, scale=3.0)
    got = cpu_dequant.dequantize(NF4Weight.from_nf4(t), torch.bfloat16)
    want = torch.from_numpy(nf4core.dequantize(t)).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(
        got.view(torch.int16), want.view(torch.int16)
    )


def test_ties_round_to_even_and_nan_is_quiet(library):
    """Scales chosen so products land exactly halfway between two BF16 values."""
    packed = torch.full((64,), 0xFF, dtype=torch.uint8)  # code 15 (1.0) everywhere
    halfway = [1.0 + 2**-8, 1.0 + 3 * 2**-8, float("nan"), 2.0]  # ties down, ties up, NaN
    w = NF4Weight(
        packed=packed,
        absmax=torch.tensor(halfway, dtype=torch.float32),
        nested_codes=None,
        nested_scales=None,
        nested_quant_map=None,
        quant_map=torch.from_numpy(nf4core.NF4_CODE.astype(np.float32)),
        nested_offset=0.0,
        nested_blocksize=256,
        shape=(128,),
        dtype="float32",
        blocksize=32,
    )
    got = cpu_dequant.dequantize(w, torch.bfloat16).view(4, 32)
    assert torch.equal(got[0].float(), torch.full((32,), 1.0))
    assert torch.equal(got[1].float(), torch.full((32,), 1.0 + 2**-6))
    assert torch.equal(got[2].view(torch.int16), torch.full((32,), 0x7FC0, dtype=torch.int16))
    assert torch.equal(got[3].float(), torch.full((32,), 2.0))


def test_auto_path_uses_the_trusted_decoder(library, rng, monkeypatch):
    kernel_self_check.reset()
    assert c_decoder_trusted(torch.bfloat16)
    calls = []
    real = cpu_dequant.dequantize
    monkeypatch.setattr(cpu_dequant, "dequantize", lambda w, d: calls.append(d) or real(w, d))
    _, t = quantized(rng, (16, 64))
    got = ops.dequantize(NF4Weight.from_nf4(t), torch.bfloat16)
    assert calls == [torch.bfloat16]
    assert torch.equal(got, torch.from_numpy(nf4core.dequantize(t)).to(torch.bfloat16))


def test_a_decoder_that_does_not_build_falls_back_with_one_warning(rng, monkeypatch):
    kernel_self_check.reset()
    monkeypatch.setattr(
        cpu_dequant, "library", lambda: (_ for _ in ()).throw(native_build.NativeUnavailable("x"))
    )
    _, t = quantized(rng, (8, 64))
    with pytest.warns(RuntimeWarning, match="c dequantize kernel"):
        got = ops_host.dequantize(NF4Weight.from_nf4(t), torch.float32)
    assert np.array_equal(bits(got), bits(nf4core.dequantize(t)))
    kernel_self_check.reset()


def test_no_c_compiler_falls_back_with_one_warning_naming_it(rng, monkeypatch, tmp_path):
    kernel_self_check.reset()
    monkeypatch.setattr(native_build, "_libs", {})
    monkeypatch.setattr(cpu_dequant, "library", functools.cache(cpu_dequant.library.__wrapped__))
    monkeypatch.setenv("NF4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    _, t = quantized(rng, (8, 64))
    with pytest.warns(RuntimeWarning, match="NativeUnavailable.*no-such-cc"):
        got = ops_host.dequantize(NF4Weight.from_nf4(t), torch.float32)
    assert np.array_equal(bits(got), bits(nf4core.dequantize(t)))
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
    kernel_self_check.reset()
