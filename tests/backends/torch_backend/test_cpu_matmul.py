"""BF16 frozen-weight matmuls for FP32 CPU training (cpu_matmul.py), LoRA on NF4 as one autograd
node (lora_nf4.py): the choice, and the numbers against the FP32 path within the BF16 tolerance of
the parity tests (kernel_self_check.RELATIVE_TOLERANCE)."""

import numpy as np
import pytest
import torch

from backends.engine import LoRASettings
from backends.kernel_self_check import RELATIVE_TOLERANCE
from backends.torch_backend import cpu_matmul
from backends.torch_backend.cpu_matmul import MIN_ROWS, force_cpu_matmul, frozen_matmul_dtype
from backends.torch_backend.lora import LoRALinear
from backends.torch_backend.model.chunked_loss import chunked_head_loss
from backends.torch_backend.nf4_linear import NF4Linear
from tests.backends.torch_backend.conftest import quantized
from tests.backends.torch_backend.test_train_step import run

BF16_TOL = RELATIVE_TOLERANCE["bfloat16"]


def test_the_choice(monkeypatch):
    x = torch.zeros(MIN_ROWS, 8)
    monkeypatch.setattr(cpu_matmul, "native_bf16_flags", lambda: ("avx512_bf16",))
    with force_cpu_matmul("auto"):
        assert frozen_matmul_dtype(x, MIN_ROWS) == torch.bfloat16
        assert frozen_matmul_dtype(x, MIN_ROWS - 1) == torch.float32  # decoding-sized
        assert frozen_matmul_dtype(x.double(), MIN_ROWS) == torch.float64  # only FP32 compute
        with torch.no_grad():  # inference keeps FP32
            assert frozen_matmul_dtype(x, MIN_ROWS) == torch.float32
        assert "BF16 inputs, FP32 accumulation (this CPU has avx512_bf16" in cpu_matmul.describe()
        monkeypatch.setattr(cpu_matmul, "native_bf16_flags", lambda: ())
        assert frozen_matmul_dtype(x, MIN_ROWS) == torch.float32
        assert "FP32 (this CPU has no native BF16" in cpu_matmul.describe()
    with force_cpu_matmul("bfloat16"):
        assert frozen_matmul_dtype(x, 1) == torch.bfloat16
    with force_cpu_matmul("float32"):
        assert frozen_matmul_dtype(x, MIN_ROWS) == torch.float32


def test_a_bad_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("NF4_CPU_MATMUL", "fp8")
    with pytest.raises(ValueError, match="NF4_CPU_MATMUL='fp8'"):
        cpu_matmul.requested()


def _lora(rng, out_f=48, in_f=64, bias=True):
    _, t = quantized(rng, (out_f, in_f))
    b = torch.from_numpy(rng.standard_normal(out_f).astype(np.float32)) if bias else None
    lora = LoRALinear.from_base(NF4Linear.from_nf4(t, b), "m", LoRASettings(r=4))
    with torch.no_grad():
        lora.lora_B.weight.normal_(std=0.1)  # B = 0 would give A no gradient
    return lora


def _grads(lora, x, fused=True, mode="float32"):
    x = x.detach().clone().requires_grad_()
    lora.zero_grad()
    real = lora._fusable
    if not fused:
        lora._fusable = lambda: False
    try:
        with force_cpu_matmul(mode):
            y = lora(x)
            y.square().sum().backward()
    finally:
        lora._fusable = real
    return [y.detach(), x.grad, lora.lora_A.weight.grad.clone(), lora.lora_B.weight.grad.clone()]


def test_fused_lora_equals_the_unfused_path(rng):
    lora = _lora(rng)
    x = torch.randn(2, 5, 64)
    for got, want in zip(_grads(lora, x, True), _grads(lora, x, False)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_bf16_matmuls_within_the_bf16_tolerance_of_fp32(rng):
    lora = _lora(rng)
    x = torch.randn(MIN_ROWS, 64)
    fp32, bf16 = _grads(lora, x, mode="float32"), _grads(lora, x, mode="bfloat16")
    for got, want in zip(bf16, fp32):
        scale = want.abs().max().item()
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=BF16_TOL, atol=BF16_TOL * scale)
    assert not torch.equal(bf16[0], fp32[0])  # the BF16 path was taken


def test_the_dequantized_weight_is_not_saved_by_the_fused_node(rng):
    lora = _lora(rng, 24, 40, bias=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        with force_cpu_matmul("bfloat16"):
            lora(torch.randn(3, 40, requires_grad=True))
    assert saved and all(tuple(s) not in ((24, 40), (40, 24)) for s in saved), saved


def test_chunked_loss_bf16_head_within_tolerance():
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 32, requires_grad=True)
    weight = torch.randn(100, 32) / 4
    ids = torch.randint(0, 100, (2, 40))
    mask = torch.rand(2, 39) > 0.2
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        loss = chunked_head_loss(hidden, weight, ids, mask, 16, matmul_dtype=dtype)
        loss.backward()
        results.append((loss.detach(), hidden.grad))
        hidden.grad = None
    (l32, g32), (l16, g16) = results
    assert l16.dtype == torch.float32 and not torch.equal(l16, l32)
    assert torch.allclose(l16, l32, rtol=BF16_TOL)
    assert torch.allclose(g16, g32, rtol=BF16_TOL, atol=BF16_TOL * g32.abs().max().item())


def test_loss_trajectory_with_bf16_matmuls_stays_within_tolerance():
    """12 optimizer steps of a tiny NF4 model (64 rows per step: the BF16 path in auto mode)."""
    with force_cpu_matmul("float32"):
        fp32, _ = run(steps=12, dropout=0.0)
    with force_cpu_matmul("bfloat16"):
        bf16, _ = run(steps=12, dropout=0.0)
    assert fp32 != bf16
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_TOL)
    assert bf16[-1] < bf16[0] - 0.5  # it learns as the FP32 run does


def test_malloc_tuning_is_applied_once_and_says_whether_it_took():
    from backends.torch_backend import malloc_tuning

    first = malloc_tuning.keep_freed_memory()
    assert isinstance(first, bool) and malloc_tuning.keep_freed_memory() is first
