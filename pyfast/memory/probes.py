"""Reading the memory of this process, its DataLoader workers and the CUDA allocator.

What each number costs to read decides how it is read (measured on Linux, 2 cores):

- RSS and anonymous RSS (`rss - shared` from /proc/PID/statm via psutil's memory_info): ~15 µs.
  Anonymous RSS is the heap, tensors and other private allocations without the file-backed pages
  of libraries and mapped files; it is what the host verdict watches. Unlike USS it does not drop
  when DataLoader workers fork (their copy-on-write pages leave the parent's USS until they exit).
- USS (psutil's memory_full_info, which walks the page tables through /proc/PID/smaps_rollup):
  ~2.5 ms per 250 MB resident, ~10 ms per GB. It is read under a time budget (by default 1% of
  the wall time between reads), for this process and for each worker, whose USS growth is the
  copy-on-write measure.
- Open file descriptors (/proc/PID/fd): ~10 µs. Worker pids (/proc/self/task/*/children): ~50 µs.
- CUDA allocated / reserved / peak: one `torch.cuda.memory_stats` call, which reads the caching
  allocator's counters and never synchronizes the device; only once CUDA is initialised.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from typing import Callable, Dict, List, Optional

import psutil

MB = 1024.0 * 1024.0


_LIBC = None


def trim_heap() -> bool:
    """Hands freed heap memory back to the OS (glibc's malloc_trim); False where there is no glibc.

    A census allocates and frees tens of MB; glibc keeps freed memory resident, and a leak then
    fills it without RSS moving, hiding the growth for a while. Trimming after a census keeps the
    monitor's own temporary memory out of what it measures.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except (OSError, TypeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def child_pids() -> List[int]:
    """Pids of the processes this process started (recursively): the DataLoader workers among them.

    Reads /proc/self/task/*/children (one small file per thread) where the kernel offers it, which
    costs microseconds; psutil's children() scans every process of the machine instead.
    """
    try:
        found = []
        frontier = [os.getpid()]
        while frontier:
            pid = frontier.pop()
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                        kids = [int(p) for p in handle.read().split()]
                except (FileNotFoundError, ProcessLookupError):
                    continue  # the thread ended meanwhile
                found.extend(kids)
                frontier.extend(kids)
        return found
    except OSError:
        return [child.pid for child in psutil.Process().children(recursive=True)]


def _children_file_available() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


class MemoryProbe:
    """One call, `read()`, returns a sample's memory fields (MB, counts) as plain Python numbers.

    full_info_budget: the fraction of wall time the page-table walks (USS of this process and of
    the workers) may take; 0 disables them. device: the CUDA device to read (default the current
    one). note: called once per unavailable measurement, with the reason.
    """

    def __init__(self, *, full_info_budget: float = 0.01, device=None, note: Callable[[str], None] = print):
        if not (0.0 <= full_info_budget <= 1.0):
            raise ValueError(f"full_info_budget must be in [0, 1], got {full_info_budget}")
        self.process = psutil.Process()
        self.full_info_budget = full_info_budget
        self.device = device
        self._note = note
        self._noted: set = set()
        self._workers: Dict[int, psutil.Process] = {}
        self.ignore_pids: set = set()  # children that are not workers (the monitor's own censuses)
        self._next_full = 0.0
        self._has_shared = hasattr(self.process.memory_info(), "shared")
        if not self._has_shared:
            self._once("anon", "anonymous RSS is not reported on this platform: the host verdict watches RSS")
        self._uss_ok = full_info_budget > 0
        if os.name == "posix" and not _children_file_available():
            self._once("children", "/proc/PID/task/TID/children is missing: finding workers scans all processes")

    def _once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self._note(message)

    # -------------------------------------------------------------- pieces

    def _fds(self) -> Optional[int]:
        try:
            if hasattr(self.process, "num_fds"):
                return self.process.num_fds()
            return self.process.num_handles()  # Windows
        except (psutil.Error, OSError, AttributeError) as error:
            self._once("fds", f"open file descriptors cannot be read ({type(error).__name__}): not reported")
            return None

    def _uss(self, process: psutil.Process) -> Optional[float]:
        try:
            return process.memory_full_info().uss / MB
        except psutil.NoSuchProcess:
            return None
        except (psutil.AccessDenied, AttributeError, NotImplementedError, OSError) as error:
            if process.pid == self.process.pid:
                self._uss_ok = False
                self._once("uss", f"USS is unavailable ({type(error).__name__}: {error}): reporting RSS only")
            return None

    def _worker_processes(self) -> List[psutil.Process]:
        pids = set(child_pids()) - self.ignore_pids
        for pid in list(self._workers):
            if pid not in pids:
                del self._workers[pid]
        for pid in pids:
            if pid not in self._workers:
                try:
                    self._workers[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
        return [self._workers[pid] for pid in sorted(self._workers)]

    def _cuda(self) -> Dict[str, Optional[float]]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return {"cuda_allocated_mb": None, "cuda_reserved_mb": None, "cuda_peak_mb": None}
        stats = torch.cuda.memory_stats(self.device)  # allocator counters: no device synchronization
        return {
            "cuda_allocated_mb": stats.get("allocated_bytes.all.current", 0) / MB,
            "cuda_reserved_mb": stats.get("reserved_bytes.all.current", 0) / MB,
            "cuda_peak_mb": stats.get("allocated_bytes.all.peak", 0) / MB,
        }

    # -------------------------------------------------------------- the sample

    def read(self) -> dict:
        info = self.process.memory_info()
        out = {
            "rss_mb": info.rss / MB,
            "anon_mb": (info.rss - info.shared) / MB if self._has_shared else None,
            "uss_mb": None,
        }
        workers = self._worker_processes()
        worker_rss = 0.0
        alive = []
        for worker in workers:
            try:
                worker_rss += worker.memory_info().rss / MB
                alive.append(worker)
            except psutil.Error:
                continue
        out["workers"] = len(alive)
        out["workers_key"] = zlib.crc32(",".join(str(w.pid) for w in alive).encode()) if alive else None
        out["workers_rss_mb"] = worker_rss
        out["workers_uss_mb"] = None

        now = time.perf_counter()
        if self._uss_ok and now >= self._next_full:
            out["uss_mb"] = self._uss(self.process)
            if alive and self._uss_ok:
                values = [self._uss(w) for w in alive]
                if all(v is not None for v in values):
                    out["workers_uss_mb"] = sum(values)
            cost = time.perf_counter() - now
            self._next_full = now + cost / self.full_info_budget
        out["fds"] = self._fds()
        out.update(self._cuda())
        return out
