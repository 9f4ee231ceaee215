"""Running an object census in a forked copy of the process.

A census walks every Python object and builds large temporary tables. Done in the training
process, its freed memory stays with the allocators (Python's small-object arenas keep their
holes), and a leak then fills those holes without RSS moving: the census would hide the growth
it is looking for, for hundreds of steps. A forked child sees the same objects (copy-on-write)
and its memory vanishes when it exits, so the training process's heap is left as it was, and the
training goes on while the child works.

In the child: no garbage collection (a collection would run finalizers, say a DataLoader
iterator's, which would talk to the parent's workers), nothing but the census, and `os._exit`
(no atexit handlers, no buffered output flushed twice). The cost is the pages the child touches
(reference counts of every object: about the size of the Python heap, for a few seconds).
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
from typing import Callable, Optional, Tuple

_RESULT, _ERROR = "result", "error"


def fork_available() -> bool:
    # Linux only: macOS frameworks are not fork-safe, Windows has no fork.
    return hasattr(os, "fork") and sys.platform.startswith("linux")


class ForkedWork:
    """`work()` run in a forked child; `poll()` / `wait()` return ("result", value) or ("error", text)."""

    def __init__(self, work: Callable[[], object]):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            status = 0
            try:
                os.close(read_fd)
                gc.disable()
                try:
                    payload = pickle.dumps((_RESULT, work()), protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as error:  # noqa: BLE001 - reported to the parent, never raised here
                    payload = pickle.dumps((_ERROR, f"{type(error).__name__}: {error}"))
                view = memoryview(payload)
                while view:
                    view = view[os.write(write_fd, view):]
            except BaseException:  # noqa: BLE001
                status = 1
            finally:
                os._exit(status)
        os.close(write_fd)
        self.pid = pid
        self._fd = read_fd
        os.set_blocking(read_fd, False)
        self._chunks = []
        self._outcome: Optional[Tuple[str, object]] = None

    def _read(self) -> bool:
        """Reads what is available; True at end of file."""
        while True:
            try:
                chunk = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return False
            if not chunk:
                return True
            self._chunks.append(chunk)

    def _finish(self) -> Tuple[str, object]:
        os.close(self._fd)
        _, status = os.waitpid(self.pid, 0)
        data = b"".join(self._chunks)
        self._chunks = []
        if not data:
            self._outcome = (_ERROR, f"the census process ended without a result (wait status {status})")
        else:
            self._outcome = pickle.loads(data)
        return self._outcome

    def poll(self) -> Optional[Tuple[str, object]]:
        """The outcome when the child is done, else None (never blocks)."""
        if self._outcome is not None:
            return self._outcome
        return self._finish() if self._read() else None

    def wait(self) -> Tuple[str, object]:
        if self._outcome is not None:
            return self._outcome
        os.set_blocking(self._fd, True)
        while not self._read():
            pass
        return self._finish()

    def kill(self) -> None:
        if self._outcome is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self._read()
            self._outcome = (_ERROR, "cancelled")
            os.close(self._fd)
            os.waitpid(self.pid, 0)


def run_in_process(work: Callable[[], object]) -> "DoneWork":
    """The same interface, for platforms without fork: `work()` runs now, here."""
    try:
        return DoneWork((_RESULT, work()))
    except Exception as error:  # noqa: BLE001 - reported like the child's errors
        return DoneWork((_ERROR, f"{type(error).__name__}: {error}"))


class DoneWork:
    pid = None

    def __init__(self, outcome: Tuple[str, object]):
        self._outcome = outcome

    def poll(self):
        return self._outcome

    def wait(self):
        return self._outcome

    def kill(self) -> None:
        pass
