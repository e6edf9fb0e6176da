"""The fast decode path (backends/torch_backend/fast_decode.py) and the GEMV group it runs on
(cpu_gemv.GemvGroup, nf4_gemv_group in cpu/nf4_gemv.cpp): a group's columns are the per-weight
kernel calls' bits and agree with the reference; decode steps give the module path's logits and the
same greedy tokens (tiny Llama, Qwen2 with q/k/v biases, Mistral with a sliding window; with and
without LoRA adapters; float32 and bfloat16); every case the fast path does not cover keeps the
module path; a projection call that fails its self-check leaves the torch-op layers."""

import warnings

import numpy as np
import pytest
import torch

import nf4core
from backends import kernel_self_check
from backends.engine import LoRASettings
from backends.torch_backend import (
    cpu_gemv,
    dequant_cache,
    dispatch,
    fast_decode,
    native_build,
    ops_reference,
    self_check,
)
from backends.torch_backend.dequant_cache import DequantCache
from backends.torch_backend.generate import SamplingConfig, generate, greedy_steps, last_logits
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.test_cpu_gemv import _variants
from tests.backends.torch_backend.tiny_models import hf_model, state_of


@pytest.fixture(scope="module", autouse=True)
def kernel():
    try:
        cpu_gemv.isa()
    except native_build.NativeUnavailable as exc:
        pytest.skip(f"the CPU GEMV kernel cannot be built here: {exc}")


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("NF4_KERNELS", raising=False)
    monkeypatch.delenv("NF4_QLORA_FAST_DECODE", raising=False)


def _weights(rng, outs, k, blocksize, double_quant):
    return [
        NF4Weight.from_nf4(
            nf4core.quantize(
                rng.standard_normal((n, k)).astype(np.float32), blocksize, double_quant
            )
        )
        for n in outs
    ]


GROUPS = [
    ((13, 7, 40), 576, 64, True),  # the wide AVX-512 path (K and blocksize multiples of 64)
    ((20, 20), 70, 64, True),  # blocks span rows
    ((5, 9, 3), 45, 32, False),  # odd K: rows start mid-byte
    ((33, 17), 130, 128, True),
]


@pytest.mark.parametrize("outs, k, blocksize, double_quant", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_columns_are_the_per_weight_calls(rng, outs, k, blocksize, double_quant, dtype):
    weights = _weights(rng, outs, k, blocksize, double_quant)
    group = cpu_gemv.GemvGroup(weights)
    assert group.out_features == sum(outs) and group.splits == list(outs)
    for rows in (1, 2, 5, 9):
        x = torch.randn(rows, k).to(dtype)
        y = group(x)
        assert y.dtype == dtype and y.shape == (rows, sum(outs))
        alone = torch.cat([cpu_gemv.linear(x, w) for w in weights], dim=-1)
        assert torch.equal(y, alone)
        # bfloat16 is computed in float32 and rounded once: the float32 reference, within that rounding
        reference = torch.cat([ops_reference.linear(x.float(), w) for w in weights], dim=-1)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        scale = float(reference.abs().max())
        torch.testing.assert_close(y.float(), reference, rtol=tol, atol=tol * scale)
    out = torch.full((3, sum(outs)), float("nan"))
    x = torch.randn(3, k)
    assert group(x, out=out) is out and torch.equal(out, group(x))


def test_group_on_every_build_variant(rng):
    """The AVX2 and generic builds (test_cpu_gemv.py's variants) give the per-weight calls too."""
    for flags in _variants().values():
        for k, blocksize in ((576, 64), (70, 32)):
            weights = _weights(rng, (9, 24), k, blocksize, True)
            x = torch.randn(3, k)
            alone = torch.cat([cpu_gemv.linear(x, w, flags) for w in weights], dim=-1)
            assert torch.equal(cpu_gemv.GemvGroup(weights, flags)(x), alone)


def test_group_refuses_what_does_not_fit(rng):
    a = _weights(rng, (8,), 64, 64, True)[0]
    with pytest.raises(ValueError, match="one input width"):
        cpu_gemv.GemvGroup([a, _weights(rng, (8,), 128, 64, True)[0]])
    with pytest.raises(ValueError, match="one input width"):
        cpu_gemv.GemvGroup([a, _weights(rng, (8,), 64, 32, True)[0]])
    with pytest.raises(ValueError, match="does not fit"):
        cpu_gemv.GemvGroup([a])(torch.randn(1, 63))
    with pytest.raises(ValueError, match="out"):
        cpu_gemv.GemvGroup([a])(torch.randn(1, 64), out=torch.empty(1, 7))


def _model(arch: str, lora: bool, dtype: torch.dtype = torch.float32, **kw) -> CausalLM:
    hf, cfg = hf_model(arch, **kw)
    model = CausalLM.from_state(cfg, state_of(hf), quantize=True, compute_dtype=dtype)
    if lora:
        apply_lora(model, LoRASettings(r=4, alpha=8.0, seed=3))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():  # B starts at zero: make the adapters change the output
            for name, p in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


MODELS = [
    ("llama", False, {}),
    ("llama", True, {}),
    ("qwen2", True, {}),  # q/k/v biases, tied embeddings
    ("mistral", False, {"sliding_window": 5}),  # the window's mask after 5 positions
]


@pytest.mark.parametrize("arch, lora, kw", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_give_the_module_paths_logits(arch, lora, kw, dtype):
    model = _model(arch, lora, dtype, **kw)
    tol = 1e-5 if dtype == torch.float32 else 0.0  # bfloat16 layers are torch ops: the same bits
    prompts = [[3, 17, 42, 5], [9, 1, 60, 33]]
    with torch.no_grad():
        for rows in (1, 2):
            ids = torch.tensor(prompts[:rows])
            fast_cache, module_cache = model.new_cache(rows, 16), model.new_cache(rows, 16)
            first = last_logits(model, ids, fast_cache)
            assert torch.equal(first, last_logits(model, ids, module_cache))
            decoder = fast_decode.decoder_for(model, fast_cache, rows)
            fused = not lora and arch != "qwen2" and dtype == torch.float32  # no bias, no adapter
            kind = fast_decode._FusedLayer if fused else fast_decode._Layer
            assert [type(layer) for layer in decoder.layers] == [kind] * 2
            ids = first.argmax(-1, keepdim=True)
            for _ in range(10):
                fast = decoder.step(ids)
                slow = last_logits(model, ids, module_cache)
                torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
                assert torch.equal(fast.argmax(-1), slow.argmax(-1))
                ids = slow.argmax(-1, keepdim=True)
            assert fast_cache.length == module_cache.length
            for a, b in zip(
                fast_cache.keys + fast_cache.values, module_cache.keys + module_cache.values
            ):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("lora", [False, True])
def test_generate_gives_the_same_tokens_with_and_without_the_fast_path(lora, monkeypatch):
    model = _model("llama", lora)
    prompt, sampling = [3, 17, 42, 5], SamplingConfig(max_new_tokens=12)
    prompts = [prompt, prompt[::-1], [1, 2, 3, 4]]
    steps = []
    real = fast_decode.FastDecoder.step
    monkeypatch.setattr(
        fast_decode.FastDecoder, "step", lambda self, ids: steps.append(1) or real(self, ids)
    )
    tokens = generate(model, prompt, sampling)
    rows = [r.tolist() for r in greedy_steps(model, prompts, 12)]
    assert len(steps) == 22  # every step after each prefill
    monkeypatch.setenv("NF4_QLORA_FAST_DECODE", "0")
    assert generate(model, prompt, sampling) == tokens
    assert [r.tolist() for r in greedy_steps(model, prompts, 12)] == rows
    assert len(steps) == 22


def _decoder(model: CausalLM, rows: int = 1):
    with torch.no_grad():
        return fast_decode.decoder_for(model, model.new_cache(rows, 8), rows)


def test_what_the_fast_path_does_not_cover_keeps_the_module_path(monkeypatch):
    model = _model("llama", False)
    assert _decoder(model) is not None
    with dispatch.force_path("reference"):
        assert _decoder(model) is None
    with torch.enable_grad():
        assert fast_decode.decoder_for(model, model.new_cache(1, 8), 1) is None
    monkeypatch.setattr(dequant_cache, "gemv_covers", lambda x: False)  # e.g. no compiler
    assert _decoder(model) is None
    monkeypatch.undo()
    with torch.no_grad(), DequantCache(budget_bytes=1 << 30).active():  # 9 rows: a dense cache
        assert fast_decode.decoder_for(model, model.new_cache(9, 8), 9) is None
    hf, cfg = hf_model("llama")
    assert _decoder(CausalLM.from_state(cfg, state_of(hf), quantize=False).eval()) is None
    dora = _model("llama", False)
    apply_lora(dora, LoRASettings(r=4, use_dora=True))
    assert _decoder(dora.eval()) is None

    class Sharded(NF4Linear):  # stands in for sharding.ShardedNF4Linear (a subclass)
        pass

    sharded = _model("llama", False)
    proj = sharded.model.layers[1].mlp.down_proj
    sharded.model.layers[1].mlp.down_proj = Sharded(proj.weight)
    assert _decoder(sharded) is None
    monkeypatch.setenv("NF4_QLORA_FAST_DECODE", "0")
    assert _decoder(model) is None
    monkeypatch.setenv("NF4_QLORA_FAST_DECODE", "yes")
    with pytest.raises(ValueError, match="NF4_QLORA_FAST_DECODE must be 0 or 1"):
        _decoder(model)


def test_decode_projection_refuses_what_does_not_fit(rng):
    group = cpu_gemv.GemvGroup(_weights(rng, (8, 8), 64, 64, True))
    y = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_gemv.DecodeProjection(group, y.double(), accumulate=False)
    with pytest.raises(ValueError, match="does not fit the group"):
        cpu_gemv.DecodeProjection(group, torch.zeros(1, 15), accumulate=False)
    table = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="more RoPE and value heads"):
        cpu_gemv.DecodeProjection(group, y, False, rope=(table, table, 4, 1))
    cache = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="KV cache does not fit"):
        cpu_gemv.DecodeProjection(group, y, False, rope=(table, table, 2, 2), cache=(cache, cache))
    keys, values = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    ones = torch.ones(4, 4)  # cos 1, sin 0: RoPE leaves y as it is
    proj = cpu_gemv.DecodeProjection(
        group, y, False, rope=(ones, table, 3, 1), cache=(keys, values)
    )
    with pytest.raises(ValueError, match="does not fit"):
        proj(torch.zeros(2, 64), 0)
    with pytest.raises(ValueError, match="refused position 4"):
        proj(torch.zeros(1, 64), 4)  # past the 4 positions of the tables
    x = torch.randn(1, 64)
    proj(x, 3)
    assert torch.equal(y, group(x))
    assert torch.equal(keys[0, 0, 3], y[0, 8:12]) and torch.equal(values[0, 0, 3], y[0, 12:16])
    assert not keys[0, 0, :3].any() and not values[0, 0, :3].any()


def test_rope_table_rows_are_the_per_step_values():
    model = _model("llama", False)
    decoder = _decoder(model)
    from backends.torch_backend.model.rope import rope_cos_sin

    for p in range(8):
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(p, p + 1), torch.float32)
        half = cos.shape[-1] // 2
        assert torch.equal(decoder.cos[p], cos[0])
        assert torch.equal(decoder.sin[p], torch.cat([-sin[0, :half], sin[0, half:]]))


def test_a_wrong_projection_call_costs_one_warning_and_runs_torch_layers(monkeypatch):
    monkeypatch.setattr(kernel_self_check, "_verdicts", {})
    real = cpu_gemv.DecodeProjection.__call__

    def wrong(self, x, position):
        real(self, x, position)
        self._held[0].add_(0.5)  # y

    monkeypatch.setattr(cpu_gemv.DecodeProjection, "__call__", wrong)
    model = _model("llama", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder, again = _decoder(model), _decoder(model)
    lines = [str(c.message) for c in caught]
    assert len(lines) == 1 and "cpu decode projection kernel (float32) disagrees" in lines[0], lines
    assert {type(layer) for layer in decoder.layers + again.layers} == {fast_decode._Layer}
    monkeypatch.setattr(cpu_gemv.DecodeProjection, "__call__", real)
    kernel_self_check.reset()
    assert self_check.cpu_decode_trusted()
    assert {type(layer) for layer in _decoder(model).layers} == {fast_decode._FusedLayer}
