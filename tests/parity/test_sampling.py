"""Temperature and top-p sampling draw from the same nucleus with the same frequencies on both
backends (the random streams differ; the distribution may not)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

from backends.mlx_backend.generate import _pick as mlx_pick  # noqa: E402
from backends.sampling import SamplingConfig  # noqa: E402
from backends.torch_backend.generate import _pick as torch_pick  # noqa: E402

PROBS = np.array([0.05, 0.3, 0.02, 0.5, 0.13])  # token 3 most likely, then 1, 4, 0, 2
DRAWS = 600


def nucleus(temperature: float, top_p: float) -> dict[int, float]:
    """The tokens top-p keeps (the most likely first, until their mass reaches top_p), renormalised."""
    p = PROBS ** (1 / temperature)
    p /= p.sum()
    kept, mass = {}, 0.0
    for token in np.argsort(-p):
        if mass >= top_p:
            break
        kept[int(token)] = p[token]
        mass += p[token]
    return {t: v / mass for t, v in kept.items()}


def torch_draws(temperature, top_p):
    logits = torch.tensor(np.log(PROBS), dtype=torch.float32)
    cfg = SamplingConfig(temperature=temperature, top_p=top_p)
    gen = torch.Generator().manual_seed(0)
    return [torch_pick(logits, cfg, gen) for _ in range(DRAWS)]


def mlx_draws(temperature, top_p):
    logits = mx.array(np.log(PROBS).astype(np.float32))
    cfg = SamplingConfig(temperature=temperature, top_p=top_p)
    keys = mx.random.split(mx.random.key(0), DRAWS)
    return [mlx_pick(logits, cfg, keys[i]) for i in range(DRAWS)]


@pytest.mark.parametrize(
    "temperature,top_p", [(1.0, 0.7), (1.0, 0.9), (1.0, 1.0), (0.5, 0.9), (2.0, 0.6)]
)
@pytest.mark.parametrize("draw", [torch_draws, mlx_draws], ids=["torch", "mlx"])
def test_draws_follow_the_nucleus(draw, temperature, top_p):
    want = nucleus(temperature, top_p)
    got = draw(temperature, top_p)
    assert set(got) == set(want)
    for token, p in want.items():
        assert abs(got.count(token) / DRAWS - p) < 0.06, (token, got.count(token) / DRAWS, p)


def test_temperature_zero_is_argmax_on_both():
    logits = np.log(PROBS).astype(np.float32)
    assert torch_pick(torch.tensor(logits), SamplingConfig(), torch.Generator()) == 3
    assert mlx_pick(mx.array(logits), SamplingConfig(), mx.random.key(0)) == 3
