"""The CPU NF4 GEMV kernel (cpu/nf4_gemv.cpp through backends/torch_backend/cpu_gemv.py) against the
reference twin and nf4core: every ISA variant this CPU can run, odd shapes, blocksizes 32..4096,
with and without double quant, 1..9 rows, float32 and bfloat16; the dequantized values it uses are
nf4core's bit for bit; decoding takes it (and keeps no dense copy); the self-check falls back, with
one warning, when the kernel is wrong or cannot be compiled. Each variant compiles once per machine
(cached by native_build.py; a few seconds with g++)."""

import platform
import shutil
import warnings

import numpy as np
import pytest
import torch

import nf4core
from backends import kernel_self_check
from backends.torch_backend import (
    cpu_gemv,
    dispatch,
    native_build,
    ops,
    ops_reference,
    self_check,
)
from backends.torch_backend.dequant_cache import DequantCache
from backends.torch_backend.generate import SamplingConfig, generate, greedy_steps
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import BLOCKSIZES, bits, quantized
from tests.backends.torch_backend.tiny_models import hf_model, state_of


def test_source_is_found_and_has_its_header():
    head = native_build.source_path(cpu_gemv.SOURCE).read_text().split("#include")[0]
    for words in ("What it computes", "Layout assumptions", "How to test it"):
        assert words in head


def _variants() -> dict[str, tuple[str, ...]]:
    """The builds to test: the default (-march=native) and, on x86-64, the AVX2 and generic paths."""
    out = {"native": cpu_gemv.FLAGS}
    if platform.machine() in ("x86_64", "AMD64"):
        out["no-avx512"] = (*cpu_gemv.FLAGS, "-mno-avx512f")
        generic = tuple(f for f in cpu_gemv.FLAGS if f != "-march=native")
        out["generic"] = (*generic, "-march=x86-64")
    return out


@pytest.fixture(scope="module")
def variants():
    try:
        built = {name: (flags, cpu_gemv.isa(flags)) for name, flags in _variants().items()}
    except native_build.NativeUnavailable as exc:
        pytest.skip(f"the CPU GEMV kernel cannot be built here: {exc}")
    return built


@pytest.fixture
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv("NF4_KERNELS", raising=False)
    kernel_self_check.reset()
    yield
    kernel_self_check.reset()


CASES = [
    ((13, 70), 64, True),  # blocks span rows (70 % 64)
    ((7, 45), 32, False),  # odd K: rows start mid-byte
    ((33, 130), 128, True),
    ((5, 1000), 4096, True),  # one block longer than a row
    ((300, 1000), 256, False),  # enough rows for threads
    ((96, 96), 64, True),
    ((3, 33), 32, True),
]


@pytest.mark.parametrize("shape, blocksize, double_quant", CASES)
def test_matches_the_reference_on_every_variant(variants, rng, shape, blocksize, double_quant):
    _, t = quantized(rng, shape, blocksize, double_quant)
    w = NF4Weight.from_nf4(t)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        x = torch.randn(rows, shape[1])
        want = ops_reference.linear(x, w)
        for name, (flags, isa) in variants.items():
            got = cpu_gemv.linear(x, w, flags)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(
                got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=f"{name} ({isa})"
            )


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_uses_the_dequantized_values_of_nf4core_bit_for_bit(variants, rng, blocksize, double_quant):
    """x = rows of the identity picks columns of W: each output is one product value * 1.0 plus
    exact zeros, so the kernel's weight values must equal nf4core's dequantize exactly."""
    shape = (9, 2 * blocksize + 6) if blocksize < 1024 else (3, 1030)
    _, t = quantized(rng, shape, blocksize, double_quant)
    w = NF4Weight.from_nf4(t)
    spec = nf4core.dequantize(t)  # (out, in)
    eye = torch.eye(shape[1])
    for flags, _ in variants.values():
        cols = torch.cat([cpu_gemv.linear(eye[i : i + 8], w, flags) for i in range(0, shape[1], 8)])
        assert np.array_equal(bits(cols.T), bits(spec))


def test_block_scales_are_bit_exact(variants, rng):
    _, t = quantized(rng, (40, 777), 64, True, scale=3.0)
    w = NF4Weight.from_nf4(t)
    want = ops_reference.block_absmax(w)
    for flags, _ in variants.values():
        got = torch.empty_like(want)
        cpu_gemv.build(flags).nf4_block_scales(
            w.nested_codes.data_ptr(),
            w.nested_scales.data_ptr(),
            w.nested_quant_map.data_ptr(),
            w.nested_offset,
            w.nested_blocksize,
            want.numel(),
            got.data_ptr(),
        )
        assert np.array_equal(bits(got), bits(want))


def test_bfloat16_and_3d_inputs(variants, rng):
    _, t = quantized(rng, (24, 200), 64, True)
    w = NF4Weight.from_nf4(t)
    x = torch.randn(2, 3, 200)
    want = ops_reference.linear(x, w)
    torch.testing.assert_close(cpu_gemv.linear(x, w), want, rtol=1e-5, atol=1e-4)
    xb = x.bfloat16()
    got = cpu_gemv.linear(xb, w)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 24)
    torch.testing.assert_close(
        got.float(), ops_reference.linear(xb, w).float(), rtol=2e-2, atol=0.1
    )


def test_auto_mode_takes_it_for_few_rows_only(variants, rng, fresh_verdicts, monkeypatch):
    layer = NF4Linear.from_nf4(quantized(rng, (16, 64))[1])
    assert self_check.cpu_gemv_trusted(torch.float32)  # its own calls are not counted below
    calls = []
    original = cpu_gemv.linear_parts
    monkeypatch.setattr(
        cpu_gemv, "linear_parts", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        layer(torch.randn(1, 1, 64))
        layer(torch.randn(cpu_gemv.MAX_ROWS, 64))
        assert len(calls) == 2
        layer(torch.randn(cpu_gemv.MAX_ROWS_PER_CALL + 1, 64))  # dequantize, then matmul
        with DequantCache(budget_bytes=1 << 20).active():  # a dense copy beats it beyond MAX_ROWS
            layer(torch.randn(cpu_gemv.MAX_ROWS + 1, 64))
        layer(torch.randn(2, 64).double())
        with dispatch.force_path("reference"):
            layer(torch.randn(1, 64))
        assert len(calls) == 2
        with dispatch.force_path("cpu"):  # forced: every row count, unchecked
            layer(torch.randn(40, 64))
        assert len(calls) == 3
    x = torch.randn(2, 64, requires_grad=True)  # training: forward by the kernel, backward exact
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 16) @ layer.dequantize())
    torch.testing.assert_close(y, x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)


def test_ops_linear_refuses_bad_input_before_the_kernel(variants, rng, fresh_verdicts):
    w = NF4Weight.from_nf4(quantized(rng, (16, 64))[1])
    with pytest.raises(ValueError, match="does not fit"):
        ops.linear(torch.randn(1, 63), w)
    layer = NF4Linear(w)
    with torch.no_grad(), pytest.raises(ValueError, match="does not fit"):
        layer(torch.randn(1, 65))


def test_generation_gives_the_same_tokens_as_the_reference_and_keeps_no_dense_copy(
    variants, fresh_verdicts, monkeypatch
):
    pytest.importorskip("transformers")
    hf, cfg = hf_model("llama")
    model = CausalLM.from_state(cfg, state_of(hf), quantize=True)
    prompt, sampling = [3, 17, 42, 5], SamplingConfig(max_new_tokens=8)
    made = []
    original = DequantCache.for_decoding.__func__
    monkeypatch.setattr(
        DequantCache,
        "for_decoding",
        classmethod(lambda cls, *a: made.append(original(cls, *a)) or made[-1]),
    )
    assert self_check.cpu_gemv_trusted(torch.float32)
    calls = []
    kernel = cpu_gemv.linear_parts
    monkeypatch.setattr(
        cpu_gemv, "linear_parts", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    tokens = generate(model, prompt, sampling)
    rows = [r.tolist() for r in greedy_steps(model, [prompt, prompt[::-1]], 8)]
    assert calls and all(c.budget == 0 and len(c) == 0 for c in made)
    with dispatch.force_path("reference"):
        assert generate(model, prompt, sampling) == tokens
        assert [r.tolist() for r in greedy_steps(model, [prompt, prompt[::-1]], 8)] == rows


def test_a_wrong_kernel_costs_one_warning_and_runs_the_reference(
    variants, rng, fresh_verdicts, monkeypatch
):
    good = cpu_gemv.linear
    monkeypatch.setattr(cpu_gemv, "linear", lambda x, w, *a: good(x, w, *a) + 0.5)
    layer = NF4Linear.from_nf4(quantized(rng, (16, 64))[1])
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        first, second = layer(x), layer(x)
    lines = [str(c.message) for c in caught]
    assert len(lines) == 1 and "cpu linear kernel (float32) disagrees" in lines[0], lines
    want = x @ layer.dequantize().T
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_no_compiler_costs_one_warning_and_runs_the_reference(
    rng, fresh_verdicts, monkeypatch, tmp_path
):
    monkeypatch.setattr(native_build, "_libs", {})
    monkeypatch.setattr(cpu_gemv, "_functions", {})
    monkeypatch.setenv("NF4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    layer = NF4Linear.from_nf4(quantized(rng, (16, 64))[1])
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        ys = [layer(x), layer(x), ops.linear(x, layer.weight)]
    lines = [str(c.message) for c in caught]
    assert len(lines) == 1 and "NativeUnavailable" in lines[0], lines
    assert "using the reference path" in lines[0]
    for y in ys:
        torch.testing.assert_close(y, x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_a_compile_error_is_one_line_naming_the_source(monkeypatch, tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    bad = tmp_path / cpu_gemv.SOURCE
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("NF4_QLORA_CPU_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(native_build, "_libs", {})
    monkeypatch.setenv("NF4_KERNEL_CACHE", str(tmp_path / "build"))
    with pytest.raises(native_build.NativeUnavailable, match=f"compiling {cpu_gemv.SOURCE} failed"):
        cpu_gemv.build()


def test_a_compiler_without_openmp_builds_a_one_thread_kernel(variants, rng, monkeypatch, tmp_path):
    real = shutil.which("g++") or shutil.which("c++")
    fake = tmp_path / "c++"
    fake.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported" >&2; exit 1; }; '
        f'done\nexec {real} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setattr(native_build, "_libs", {})
    monkeypatch.setattr(cpu_gemv, "_functions", {})
    monkeypatch.setenv("NF4_KERNEL_CACHE", str(tmp_path / "build"))
    w = NF4Weight.from_nf4(quantized(rng, (300, 1000), 64, True)[1])
    x = torch.randn(3, 1000)
    torch.testing.assert_close(
        cpu_gemv.linear(x, w), ops_reference.linear(x, w), rtol=1e-5, atol=1e-4
    )
