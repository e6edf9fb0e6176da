"""The shared verdict of the kernels' self-checks (backends/kernel_self_check.py): bit-exact or
within the dtype's tolerance, NaN never passes, a raising kernel is untrusted, each verdict is
reached once and warned about once."""

import warnings

import numpy as np
import pytest

from backends import kernel_self_check


@pytest.fixture(autouse=True)
def fresh():
    kernel_self_check.reset()
    yield
    kernel_self_check.reset()


def _verdict(pairs, dtype="float32", exact=False):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ok = kernel_self_check.trusted("triton", "linear", dtype, "cpu", lambda: pairs, exact)
    return ok, [str(w.message) for w in record]


def test_within_the_dtype_tolerance_passes_silently():
    want = np.linspace(-4, 4, 50, dtype=np.float32)
    assert _verdict([(want * (1 + 1e-2), want)], "bfloat16") == (True, [])


def test_past_the_tolerance_is_untrusted_with_the_largest_difference():
    want = np.linspace(-4, 4, 50, dtype=np.float32)
    ok, (message,) = _verdict([(want * (1 + 1e-2), want)], "float32")
    assert not ok
    assert message == (
        "triton linear kernel (float32) disagrees with the reference on a self-check "
        "(max |diff| 0.04); using the reference path"
    )


def test_exact_means_every_bit():
    want = np.ones(8, np.float32)
    got = want.copy()
    got[3] = np.nextafter(np.float32(1), np.float32(2))
    assert not _verdict([(got, want)], exact=True)[0]
    kernel_self_check.reset()
    assert _verdict([(want.copy(), want)], exact=True) == (True, [])


def test_nan_and_a_wrong_shape_never_pass():
    want = np.ones(4, np.float32)
    ok, (message,) = _verdict([(np.array([1, np.nan, 1, 1], np.float32), want)], "bfloat16")
    assert not ok and "max |diff| inf" in message
    kernel_self_check.reset()
    ok, (message,) = _verdict([(np.ones(5, np.float32), want)])
    assert not ok and "shape (5,) instead of (4,)" in message


def test_a_raising_kernel_is_untrusted_and_the_verdict_is_cached():
    calls = []

    def run():
        calls.append(1)
        raise RuntimeError("PassManager::run failed\nmore detail")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not kernel_self_check.trusted("metal", "matmul", "float16", "gpu", run, False)
    assert calls == [1]
    assert [str(w.message) for w in record] == [
        "metal matmul kernel (float16) failed on a self-check "
        "(RuntimeError: PassManager::run failed); using the reference path"
    ]


def test_the_tolerance_is_the_parity_tests_allclose():
    """|got - want| <= tol * max|want| + tol * |want|: 1.5 tol * max passes on the largest output,
    fails on a zero one."""
    want = np.array([4.0, 0.0, 1.0], np.float32)
    tol = kernel_self_check.RELATIVE_TOLERANCE["float16"]
    at_max = want + np.array([1.5 * tol * 4, 0, 0], np.float32)
    assert _verdict([(at_max, want)], "float16") == (True, [])
    kernel_self_check.reset()
    at_zero = want + np.array([0, 1.5 * tol * 4, 0], np.float32)
    assert not _verdict([(at_zero, want)], "float16")[0]
