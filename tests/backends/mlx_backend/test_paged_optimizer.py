"""PagedAdamW against MLX's own optim.AdamW: 20 steps, a save/load round trip in the middle."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
optim = pytest.importorskip("mlx.optimizers")
from mlx.utils import tree_flatten

from backends.mlx_backend.paged_optimizer import PagedAdamW, PagedAdamWConfig
from backends.schedule import learning_rate_at


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layers": [
            {
                "lora_A": mx.array(rng.standard_normal((4, 37)).astype(np.float32)),
                "lora_B": mx.array(rng.standard_normal((29, 4)).astype(np.float32)),
            }
        ],
        "bias": mx.array(rng.standard_normal((7,)).astype(np.float32)),
    }


def _grads(step):
    return _params(seed=100 + step)  # same tree, fresh values


@pytest.mark.parametrize("placement", ["host", "device"])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("budget", [None, 12 * 60])  # all resident / most pages spilled to disk
def test_matches_mlx_adamw_with_save_load(tmp_path, bias_correction, budget, placement):
    config = PagedAdamWConfig(
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.05,
        bias_correction=bias_correction,
        page_elements=50,
        placement=placement,
        resident_budget_bytes=budget,
        spill_dir=str(tmp_path),
    )
    paged = PagedAdamW(config)
    paged.init(_params())
    if budget is not None:
        assert paged.spilled_bytes > 0 and paged.resident_bytes <= budget
    ref = optim.AdamW(
        learning_rate=1e-2,
        betas=[0.9, 0.99],
        eps=1e-8,
        weight_decay=0.05,
        bias_correction=bias_correction,
    )
    ref_params = _params()
    ref.init(ref_params)
    for step in range(20):
        lr = learning_rate_at(step, 1e-2, 3, 20, "cosine")
        ref.learning_rate = lr
        ref_params = ref.apply_gradients(_grads(step), ref_params)
        params = paged.step(_grads(step), lr)
        if step == 9:  # round trip through a file into a fresh optimizer
            paged.save(tmp_path / "opt.safetensors")
            paged = PagedAdamW(config)
            paged.init(_params(seed=1))  # the parameters come back from the saved masters
            paged.load(tmp_path / "opt.safetensors")
            assert paged.step_count == 10
    for (name, a), (_, b) in zip(tree_flatten(params), tree_flatten(ref_params)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(np.array(params["bias"]), np.array(_params()["bias"]))


def test_bfloat16_params_keep_float32_masters():
    p = {"w": mx.ones((8,), dtype=mx.bfloat16)}
    opt = PagedAdamW(PagedAdamWConfig(bias_correction=True))
    opt.init(p)
    for _ in range(30):  # each update (1e-4) is far below bfloat16's spacing at 1.0 (2**-7)
        p = opt.step({"w": mx.ones((8,), dtype=mx.bfloat16)}, 1e-4)
    assert p["w"].dtype == mx.bfloat16
    master = opt.state_dict()[0]["w.master"]
    np.testing.assert_allclose(master, 1.0 - 30e-4, rtol=1e-4)  # the masters moved ...
    assert float(p["w"][0]) == pytest.approx(float(mx.array(1.0 - 30e-4).astype(mx.bfloat16)))


def test_config_validation_and_mismatched_grads():
    with pytest.raises(ValueError):
        PagedAdamWConfig(betas=(1.0, 0.9))
    opt = PagedAdamW()
    with pytest.raises(RuntimeError, match="init"):
        opt.step({"w": mx.zeros(2)}, 1e-3)
    opt.init({"w": mx.zeros(2)})
    with pytest.raises(KeyError):
        opt.step({"v": mx.zeros(2)}, 1e-3)


def test_paging_bounds_the_transient_memory_of_a_step():
    """An unpaged step holds old and new state (3x the parameter); a paged one about the output."""
    n = 1 << 20
    grads = {"w": mx.ones((n,))}

    def peak(page_elements):
        opt = PagedAdamW(PagedAdamWConfig(page_elements=page_elements, placement="device"))
        opt.init({"w": mx.zeros((n,))})
        mx.eval(grads, opt.step(grads, 1e-3))  # compile the page update first
        mx.clear_cache()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        mx.eval(opt.step(grads, 1e-3))
        return (mx.get_peak_memory() - start) / (n * 4)

    assert peak(n // 16) < 1.5
    assert peak(n) > 2.5  # the measurement tells the difference


def test_host_placement_keeps_state_out_of_mlx_memory():
    n = 1 << 20
    opt = PagedAdamW(PagedAdamWConfig(page_elements=n // 8, placement="host"))
    params = {"w": mx.zeros((n,))}
    mx.eval(params)
    start = mx.get_active_memory()
    opt.init(params)
    mx.eval(opt.step({"w": mx.ones((n,))}, 1e-3))
    # the 12 MiB of state are numpy pages; MLX holds about the new parameter and its gradient
    assert mx.get_active_memory() - start < 3 * n * 4
