"""The one learning-rate schedule (backends/schedule.py) that the pipeline gives both backends."""

import math

import pytest

from backends.schedule import learning_rate_at


def test_warmup_starts_at_peak_over_w_then_cosine_to_the_floor():
    lrs = [learning_rate_at(s, 1.0, 4, 14, "cosine") for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[9], 0.5)
    assert lrs[14] == lrs[19] == 1e-6  # never exactly 0
    assert lrs[4:15] == sorted(lrs[4:15], reverse=True)


def test_linear_and_constant():
    assert [learning_rate_at(s, 2.0, 0, 10, "linear") for s in (0, 5)] == [2.0, 1.0]
    assert learning_rate_at(10, 2.0, 0, 10, "linear") == 2e-6
    assert [learning_rate_at(s, 2.0, 2, 5, "constant") for s in range(4)] == [1.0, 2.0, 2.0, 2.0]


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="'step'"):
        learning_rate_at(0, 1.0, 0, 10, "step")
