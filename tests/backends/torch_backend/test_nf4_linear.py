import numpy as np
import torch
from torch import nn

import nf4core
from backends.engine import LoRASettings
from backends.torch_backend.lora import LoRALinear
from backends.torch_backend.nf4_linear import NF4Linear
from tests.backends.torch_backend.conftest import bits, quantized


def dense_of(layer: NF4Linear, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(nf4core.dequantize(layer.to_nf4())).to(dtype)


def test_forward_matches_dense_and_weight_is_frozen(rng):
    _, t = quantized(rng, (13, 37))
    bias = rng.standard_normal(13).astype(np.float32)
    layer = NF4Linear.from_nf4(t, bias)
    x = torch.randn(4, 37, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, x @ dense_of(layer).T + torch.from_numpy(bias), atol=1e-5)
    assert list(layer.parameters()) == []  # nothing of the base can receive a gradient
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 13) @ dense_of(layer), atol=1e-5)


def test_from_linear_quantizes_like_nf4core():
    lin = nn.Linear(64, 10)
    layer = NF4Linear.from_linear(lin, blocksize=32, double_quant=False)
    t = nf4core.quantize(lin.weight.detach().numpy(), blocksize=32, double_quant=False)
    assert np.array_equal(bits(layer.dequantize()), bits(nf4core.dequantize(t)))


def test_gradcheck_float64_input_and_adapters(rng):
    _, t = quantized(rng, (6, 10), 32)
    base = NF4Linear.from_nf4(t, rng.standard_normal(6))
    lora = LoRALinear.from_base(base, "m", LoRASettings(r=3, alpha=6.0), torch.float64)
    with torch.no_grad():
        lora.lora_B.weight.normal_()  # B = 0 at init would hide half of the adapter gradient
    a, b = lora.lora_A.weight, lora.lora_B.weight
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)

    def through_module(x, a_in, b_in):
        return torch.func.functional_call(
            lora, {"lora_A.weight": a_in, "lora_B.weight": b_in}, (x,)
        )

    assert torch.autograd.gradcheck(lambda x: base(x), (x,))
    assert torch.autograd.gradcheck(
        through_module,
        (x, a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()),
    )
    # and the module's own autograd against the dense float64 formula
    out = lora(x)
    out.square().sum().backward()
    xd = x.detach().clone().requires_grad_()
    ad, bd = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    dense = dense_of(base, torch.float64)
    ref = xd @ dense.T + base.bias.double() + (xd @ ad.T @ bd.T) * lora.scale
    ref.square().sum().backward()
    for got, want in [(x.grad, xd.grad), (a.grad, ad.grad), (b.grad, bd.grad)]:
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_bf16_gradients_within_tolerance(rng):
    _, t = quantized(rng, (32, 48))
    base = NF4Linear.from_nf4(t)
    lora = LoRALinear.from_base(base, "m", LoRASettings(r=4), torch.float32)
    with torch.no_grad():
        lora.lora_B.weight.normal_(std=0.1)
    x32 = torch.randn(5, 48)
    x16 = x32.to(torch.bfloat16).requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    out16 = lora(x16)
    assert out16.dtype == torch.bfloat16
    out16.float().sum().backward()
    g16 = (x16.grad.float(), lora.lora_A.weight.grad.clone(), lora.lora_B.weight.grad.clone())
    lora.zero_grad()
    lora(x32).sum().backward()
    g32 = (x32.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad)
    for a, b in zip(g16, g32):
        assert torch.allclose(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_dequantized_weight_is_not_saved_for_backward(rng):
    out_f, in_f = 24, 40
    _, t = quantized(rng, (out_f, in_f))
    lora = LoRALinear.from_base(NF4Linear.from_nf4(t), "m", LoRASettings(r=2))
    x = torch.randn(3, in_f, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora(x)
    assert saved, "the hook must see the adapter's saved tensors"
    assert all(s not in ((out_f, in_f), (in_f, out_f)) for s in saved), saved
    assert all(int(np.prod(s)) < out_f * in_f for s in saved)
    y.sum().backward()
    assert x.grad is not None


def test_hook_would_catch_a_dense_layer():  # the proof above can fail: a dense W is saved
    lin = nn.Linear(40, 24)
    x = torch.randn(3, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
    ):
        lin(x)
    assert (24, 40) in saved or (40, 24) in saved


def test_module_to_moves_buffers_and_state_dict_round_trips(rng):
    _, t = quantized(rng, (8, 64))
    layer = NF4Linear.from_nf4(t)
    layer2 = NF4Linear.from_nf4(quantized(rng, (8, 64))[1])
    layer2.load_state_dict(layer.state_dict())
    assert torch.equal(layer2.dequantize(), layer.dequantize())
    before = layer.dequantize()
    layer.to(torch.float64)  # casts the bias; the NF4 data keep their dtypes (bit-exactness)
    assert layer.packed.dtype == torch.uint8 and layer.quant_map.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)


def test_bnb_state_dict_reads_back_through_nf4core(rng):
    _, t = quantized(rng, (6, 64))
    layer = NF4Linear.from_nf4(t, np.arange(6, dtype=np.float32))
    state = layer.bnb_state_dict("model.layers.0.mlp.up_proj")
    assert state["model.layers.0.mlp.up_proj.weight"].shape == (6 * 64 // 2, 1)
    back = nf4core.nf4_from_state_dict(state, "model.layers.0.mlp.up_proj")
    assert np.array_equal(bits(nf4core.dequantize(back)), bits(layer.dequantize()))
    assert np.array_equal(state["model.layers.0.mlp.up_proj.bias"], np.arange(6))
