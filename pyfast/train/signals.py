"""Ctrl-C / SIGTERM: ask the loop to stop after the current optimizer step.

The first signal only sets `requested`; the loop finishes its step, saves a checkpoint, writes the
summary and plots, and exits with 128 + the signal number. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.requested) if self.requested else 0

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
