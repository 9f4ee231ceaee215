"""One search for what grows: a census at the window's start, tracemalloc over the window, a
census at its end, and their comparison (`pyfast.memory.growers`).

    search = GrowthSearch("host", step, own_ids=..., window_steps=50, tracemalloc_frames=25)
    ...                                     # every sample:
    if search.due(step): search.end_window(step, own_ids)
    outcome = search.poll()                 # ("result", report) / ("error", text) when done, else None

Where fork is available the censuses run in forked children (`pyfast.memory.fork`): the training
goes on meanwhile and its heap is not disturbed. Elsewhere they run here, blocking.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import tempfile
import time
import tracemalloc
from functools import partial
from typing import Callable, List, Optional, Set, Tuple

from pyfast.memory.fork import DoneWork, ForkedWork, fork_available, run_in_process
from pyfast.memory.growers import allocation_sites, find_growers, take_census
from pyfast.memory.probes import trim_heap

WINDOW, COMPARING = "window", "comparing"
_CENSUS_FILES: set = set()  # census files not yet removed: gone at exit, whatever happened


@atexit.register
def _remove_census_files() -> None:
    for path in list(_CENSUS_FILES):
        _unlink(path)


def _unlink(path: str) -> None:
    _CENSUS_FILES.discard(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _census_to_file(step: int, exclude: List[int], path: str) -> float:
    """The first child: a census, handed to the second child through a file, not through the
    parent (whose heap would keep the unpickled tables' holes). Returns its duration."""
    census = take_census(step, exclude, collect=False)
    with open(path, "wb") as handle:
        pickle.dump(census, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return census.seconds


def _compare_in_child(path: str, step: int, trigger: str, exclude: List[int], baseline) -> dict:
    """The second child: allocation sites first (the snapshot is this copy of the parent's
    traces), then tracing off (it would slow the census tenfold), then census and comparison."""
    sites = None
    if tracemalloc.is_tracing():
        sites = allocation_sites(tracemalloc.take_snapshot(), baseline)
        tracemalloc.stop()
    return find_growers(_read_census(path), step, trigger=trigger, exclude=exclude, sites=sites, collect=False)


def _read_census(path: str):
    # In a function of its own: the file object must be gone before the census, which would count it.
    with open(path, "rb") as handle:
        census = pickle.load(handle)
    _unlink(path)  # read once: no need to wait for the parent to remove it
    return census


class GrowthSearch:
    def __init__(self, trigger: str, step: int, *, own_ids: List[int], window_steps: int,
                 tracemalloc_frames: int, fork: Optional[bool] = None):
        self.trigger = trigger
        self.start = step
        self.end: Optional[int] = None
        self.stage = WINDOW
        self.window_steps = window_steps
        self.forked = fork_available() if fork is None else (fork and fork_available())
        self._frames = tracemalloc_frames
        self._started_tracing = False
        self._baseline = None
        self._comparison = None
        self.started_at = time.perf_counter()

        self._census_path: Optional[str] = None
        gc.collect()  # here, not in a child: finalizers belong to this process
        if self.forked:
            handle, self._census_path = tempfile.mkstemp(prefix="pyfast-census-", suffix=".pickle")
            os.close(handle)
            _CENSUS_FILES.add(self._census_path)
            self._census = ForkedWork(partial(_census_to_file, step, own_ids, self._census_path))
        else:
            self._census = run_in_process(partial(take_census, step, own_ids, False))
            trim_heap()
        if tracemalloc_frames:  # after the fork: the child need not trace
            if tracemalloc.is_tracing():
                self._baseline = tracemalloc.take_snapshot()  # the caller's tracing: compare with now
            else:
                tracemalloc.start(tracemalloc_frames)
                self._started_tracing = True

    @property
    def pids(self) -> Set[int]:
        """Children at work (not DataLoader workers: the probe leaves them out)."""
        return {w.pid for w in (self._census, self._comparison) if w is not None and w.pid is not None}

    def due(self, step: int) -> bool:
        return self.stage == WINDOW and step - self.start >= self.window_steps

    def end_window(self, step: int, own_ids: List[int]) -> None:
        status, census = self._census.wait()  # forked: the census's duration (the census is in a file)
        self._census = None
        self.end = step
        self.stage = COMPARING
        if status != "result":
            self._stop_tracing()
            self._remove_file()
            self._comparison = DoneWork((status, census))  # the first census failed: report why
            return
        gc.collect()
        if self.forked:
            work = partial(_compare_in_child, self._census_path, step, self.trigger, own_ids, self._baseline)
            own_ids.extend((id(work), id(work.args), id(work.keywords)))  # the child's own call, not counted
            self._comparison = ForkedWork(work)
            self._stop_tracing()
        else:
            sites = None
            if tracemalloc.is_tracing():
                sites = allocation_sites(tracemalloc.take_snapshot(), self._baseline)
            self._stop_tracing()  # before the census: tracing would slow it tenfold
            self._comparison = run_in_process(partial(find_growers, census, step, trigger=self.trigger,
                                                      exclude=own_ids, sites=sites))
        del census
        self._baseline = None
        trim_heap()  # tracemalloc's tables (and an in-process census) go back to the OS

    def _stop_tracing(self) -> None:
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False

    def _remove_file(self) -> None:
        if self._census_path is not None:
            _unlink(self._census_path)
            self._census_path = None

    def poll(self) -> Optional[Tuple[str, object]]:
        if self.stage != COMPARING:
            return None
        outcome = self._comparison.poll()
        if outcome is not None:
            self._remove_file()
        return outcome

    def wait(self, last_step: int, own_ids: Callable[[], List[int]]) -> Tuple[str, object]:
        """Ends the search now (at `last_step` if its window is still open) and waits for it."""
        if self.stage == WINDOW:
            self.end_window(last_step, own_ids())
        outcome = self._comparison.wait()
        self._remove_file()
        return outcome

    def cancel(self) -> None:
        for work in (self._census, self._comparison):
            if work is not None:
                work.kill()
        self._stop_tracing()
        self._remove_file()

