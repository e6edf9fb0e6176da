"""The SIGINT handler of a training loop: the first interrupt is a request, the second aborts."""

import os
import signal

import pytest

from backends.interrupts import Interrupts


def test_first_interrupt_asks_the_loop_to_stop_and_the_second_aborts(capfd):
    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert "interrupt: finishing this step, then saving" in capfd.readouterr().err
