"""Ctrl-C during a training run: the first asks to stop after the current step, the second aborts."""

from __future__ import annotations

import os
import signal
import threading


class Interrupts:
    """The first SIGINT asks the loop to stop after the current step and save; a second one aborts
    at once (KeyboardInterrupt). Signals can only be handled in the main thread; elsewhere (or not
    `enabled`) the default behaviour stays."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __enter__(self) -> Interrupts:
        self.requested, self._previous = False, None
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        os.write(2, b"\ninterrupt: finishing this step, then saving (interrupt again to abort)\n")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
