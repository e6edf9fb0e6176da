import io

import pytest
import torch

from backends.torch_backend.paged_adamw import PagedAdamW

SHAPES = [(7,), (33, 5), (128, 257), (4, 3, 9)]


def make_params(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads_for(step: int, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def round_trip(opt_state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(opt_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("paged,page_bytes", [(False, 1 << 20), (True, 1 << 20), (True, 600)])
def test_matches_torch_adamw_for_20_steps_with_a_state_dict_round_trip(paged, page_bytes):
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, ref = make_params(0), make_params(0)
    opt = PagedAdamW(ours, page_bytes=page_bytes, paged=paged, **kw)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    for step in range(20):
        for p, q, g in zip(ours, ref, grads_for(step, ours)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        if step == 9:  # save, rebuild, load: the run continues from the saved state
            saved = round_trip(opt.state_dict())
            opt = PagedAdamW(ours, page_bytes=page_bytes, paged=paged, **kw)
            opt.load_state_dict(saved)
            ref_opt.load_state_dict(round_trip(ref_opt.state_dict()))
    for p, q in zip(ours, ref):
        assert (p - q).abs().max() <= 1e-6
    for p, q in zip(ours, ref):
        st, rst = opt.state[p], ref_opt.state[q]
        assert torch.allclose(st["exp_avg"], rst["exp_avg"].reshape(-1), atol=1e-6)
        assert torch.allclose(st["exp_avg_sq"], rst["exp_avg_sq"].reshape(-1), atol=1e-6)


def test_small_pages_cut_parameters_into_chunks():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = PagedAdamW([p], page_bytes=4 * 2 * 2 * 100, paged=True)
    p.grad = torch.randn(1000)
    opt.step()
    (page,) = opt._pages.values()
    assert page.shape == (2, 2, 100)  # two buffers of (exp_avg, exp_avg_sq) x 100 elements


def test_bf16_params_keep_an_fp32_master_copy():
    kw = dict(lr=1e-4, weight_decay=0.0)
    ours = make_params(2, torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = PagedAdamW(ours, paged=True, page_bytes=4096, **kw)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    for step in range(20):
        for p, q, g in zip(ours, ref, grads_for(step, ours)):
            p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        master = opt.state[p]["master"].view(p.shape)
        assert (master - q).abs().max() <= 1e-6  # updates of 1e-4 survive (BF16 would lose them)
        assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))
    assert any((q.detach().to(torch.bfloat16).float() - q).abs().max() > 0 for q in ref)


def test_validation():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError):
        PagedAdamW(p, lr=-1)
    with pytest.raises(ValueError):
        PagedAdamW(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="groups"):
        PagedAdamW(p).load_state_dict({"param_groups": [], "state": {}})


@pytest.mark.gpu
def test_cuda_state_lives_on_the_host_and_matches():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    ours = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(0)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = PagedAdamW(ours, lr=1e-3, page_bytes=4096)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01, foreach=False)
    for step in range(20):
        for p, q, g in zip(ours, ref, grads_for(step, ours)):
            p.grad, q.grad = g.cuda(), g.cuda()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert opt.state[p]["exp_avg"].device.type == "cpu" and opt.state[p]["exp_avg"].is_pinned()
        assert (p - q).abs().max() <= 1e-6
