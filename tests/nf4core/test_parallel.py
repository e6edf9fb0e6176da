import os
import signal
import sys
import time

import numpy as np
import pytest

import nf4core
from nf4core.parallel import for_each_slice


def test_slices_cover_the_range_once():
    seen = np.zeros(1000, np.int64)

    def mark(start, stop):
        seen[start:stop] += 1

    for_each_slice(1000, 64, mark)
    assert np.all(seen == 1)


def test_exceptions_in_a_slice_reach_the_caller():
    def fail(start, stop):
        raise RuntimeError(f"slice {start}")

    with pytest.raises(RuntimeError, match="slice"):
        for_each_slice(1000, 64, fail)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")
def test_quantize_works_in_a_forked_child_after_the_pool_started():
    w = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    expected = nf4core.quantize(w).packed.tobytes()  # starts the worker pool in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not hang on the parent's (threadless) pool
        ok = nf4core.quantize(w).packed.tobytes() == expected
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("quantize hung in a forked child")
    assert os.read(read, 1) == b"1"
