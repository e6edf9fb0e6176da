import math

import pytest

from backends.torch_backend.schedule import ScheduleConfig


def test_warmup_then_cosine_to_the_floor():
    s = ScheduleConfig("cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == 1.0
    assert math.isclose(s.factor(9), 0.1 + 0.9 * 0.5)
    assert math.isclose(s.factor(14), 0.1) and math.isclose(s.factor(100), 0.1)
    values = [s.factor(i) for i in range(4, 15)]
    assert values == sorted(values, reverse=True)


def test_linear_and_constant():
    lin = ScheduleConfig("linear", warmup_steps=0, total_steps=10)
    assert [lin.factor(i) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert ScheduleConfig("constant", warmup_steps=2, total_steps=5).factor(4) == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        dict(kind="step"),
        dict(total_steps=0),
        dict(warmup_steps=20, total_steps=10),
        dict(min_lr_ratio=2.0),
    ],
)
def test_validation(bad):
    with pytest.raises(ValueError):
        ScheduleConfig(**bad)
