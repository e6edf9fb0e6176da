import numpy as np
import pytest
import torch

from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import quantized


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (3,), (300, 129)])
def test_round_trip_is_bit_exact(rng, shape, double_quant):
    _, t = quantized(rng, shape, 64, double_quant)
    back = NF4Weight.from_nf4(t).to_nf4()
    assert np.array_equal(back.packed, t.packed)
    assert np.array_equal(back.block_absmax().view(np.uint32), t.block_absmax().view(np.uint32))
    assert back.shape == t.shape and back.dtype == t.dtype and back.blocksize == t.blocksize
    if double_quant:
        assert np.array_equal(back.double_quant.codes, t.double_quant.codes)
        assert back.double_quant.offset == t.double_quant.offset
        assert np.array_equal(back.double_quant.scales, t.double_quant.scales)
    else:
        assert back.double_quant is None and np.array_equal(back.absmax, t.absmax)


def test_to_returns_a_copy_and_leaves_self_alone(rng):
    _, t = quantized(rng, (8, 8))
    w = NF4Weight.from_nf4(t)
    packed = w.packed
    moved = w.to(torch.device("cpu"))
    assert moved is not w and moved.device.type == "cpu"
    assert w.packed is packed  # self is never modified


def test_validation_names_the_problem(rng):
    _, t = quantized(rng, (4, 16))
    w = NF4Weight.from_nf4(t)
    with pytest.raises(ValueError, match="bytes"):
        NF4Weight(**{**w.__dict__, "packed": w.packed[:-1]})
    with pytest.raises(ValueError, match="exactly one"):
        NF4Weight(**{**w.__dict__, "absmax": torch.ones(1)})


def test_nbytes_is_about_4_127_bits_per_weight(rng):
    _, t = quantized(rng, (256, 1024))
    w = NF4Weight.from_nf4(t)
    tables = (16 + 256) * 4 + 0
    bits = (w.nbytes - tables) * 8 / w.numel
    assert abs(bits - 4.127) < 0.001
