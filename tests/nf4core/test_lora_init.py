import numpy as np
import pytest

from nf4core import lora_init


def test_same_seed_and_name_give_the_same_adapter():
    a1, b1 = lora_init("model.layers.0.self_attn.q_proj", 96, 80, 8, seed=3)
    a2, _ = lora_init("model.layers.0.self_attn.q_proj", 96, 80, 8, seed=3)
    a3, _ = lora_init("model.layers.1.self_attn.q_proj", 96, 80, 8, seed=3)
    a4, _ = lora_init("model.layers.0.self_attn.q_proj", 96, 80, 8, seed=4)
    assert a1.tobytes() == a2.tobytes()
    assert not np.array_equal(a1, a3) and not np.array_equal(a1, a4)
    assert a1.shape == (8, 96) and a1.dtype == np.float32
    assert b1.shape == (80, 8) and not b1.any()


def test_a_has_the_range_of_peft_kaiming_uniform():
    torch = pytest.importorskip("torch")
    reference = torch.empty(512, 300)
    torch.nn.init.kaiming_uniform_(reference, a=5**0.5)  # what PEFT does to lora_A
    a, _ = lora_init("x", 300, 10, 512, seed=0)
    bound = float(reference.abs().max())
    assert abs(np.abs(a).max() - bound) < 0.01 * bound
    assert abs(a.std() - float(reference.std())) < 0.02 * float(reference.std())


def test_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="positive"):
        lora_init("x", 10, 10, 0, seed=0)
