"""Ctrl-C / SIGTERM: ask the loop to stop after the current optimizer step.

The first signal only sets `requested`; the loop finishes its step, saves a checkpoint, writes the
summary and plots, and exits with 128 + the signal number. A second Ctrl-C interrupts at once.

With several ranks a signal reaches one process (SIGTERM to one rank) or all of them (Ctrl-C in a
terminal). Each step's control all-reduce carries every rank's request, and `agreed` is the stop
they all read there, so every rank stops after the same step. Under torchrun a Ctrl-C arrives twice
(from the terminal, then forwarded by torchrun), so there the second one does not interrupt:
torchrun itself kills a process that does not stop in time.
"""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """alone: this process decides alone (one rank), else `agreed` is the stop in force.
    second_interrupt_raises: a second Ctrl-C raises KeyboardInterrupt (not under torchrun)."""

    def __init__(self, *, alone: bool = True, second_interrupt_raises: bool = True):
        self.requested: int | None = None  # the signal this process received
        self.agreed: int | None = None  # the stop every rank read in a step's control all-reduce
        self.alone = alone
        self.second_interrupt_raises = second_interrupt_raises
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT and self.second_interrupt_raises:
            raise KeyboardInterrupt
        self.requested = signum

    @property
    def signal(self) -> int | None:
        """The stop in force: this process's signal when it decides alone, else the agreed one."""
        return self.requested if self.alone else self.agreed

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal) if self.signal else 0

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
