"""FeatureCache: one verified safetensors file per (fingerprint, key), safe under concurrent use.

Layout: `root/v1/<fingerprint hash>/<2 hex>/<key hash>.safetensors`. Each file is a Packed
buffer (pyfast.pack) whose safetensors metadata holds the format version, the key, the
fingerprint and a checksum. Writes are atomic (temporary name, fsync, os.replace): concurrent
writers of one key (DataLoader workers, ranks, separate runs) each replace the entry with a
complete file, and readers see an old complete file, a new complete file, or none.

Reads take the whole file with one read() into memory rather than mmap: entries are small
(100 KB - 1 MB), where a read is cheaper than setting up and faulting a mapping, and a mapping of a
file truncated underneath us would kill the process with SIGBUS where a read just comes up short.

The checksum is xxh3-64 over the data and the tensor table (names, shapes, offsets): about
8 GB/s on one core, where zlib.crc32 and adler32 measure about 1 GB/s, so verifying a warm read
costs little next to the read itself (benchmarks/bench_cache.py measures both). The rest of the
header is checked field by field, so a truncated or bit-flipped entry never comes back as data:
it is counted as corrupt, removed, logged and reported as a miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import torch
import xxhash

from pyfast import _io
from pyfast.cache.format import PackedFormatError
from pyfast.cache.keys import entry_name
from pyfast.cache.packed import (
    NONFINITE_POLICIES,
    OVERFLOW_POLICIES,
    Packed,
    _policy_error,
    pack,
    packed_from_bytes,
)
from pyfast.ops._checks import check_choice
from pyfast.ops.pack import PACK_DTYPES

log = logging.getLogger("pyfast.cache")

CACHE_FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
_LAYOUT = "v1"
# Eviction frees down to this fraction of max_bytes, so one pass pays for many puts.
_EVICT_TO = 0.9


@dataclass
class CacheStats:
    """Counters of one FeatureCache object (one process: DataLoader workers each count their own)."""

    hits: int = 0
    misses: int = 0  # corrupt entries count here too
    corrupt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    evicted: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        """Totals of two counters, e.g. those reported back by DataLoader workers."""
        return CacheStats(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


def checksum(payload, table: bytes) -> str:
    h = xxhash.xxh3_64(payload)
    h.update(table)
    return f"xxh3_64:{h.hexdigest()}"


class FeatureCache:
    """A disk cache of per-sample feature tensors.

    root: the cache folder (shared by every fingerprint). fingerprint: names what produced the
    features (see pyfast.cache.keys.make_fingerprint); entries of another fingerprint never match.
    verify: check each entry's checksum on read (header fields are always checked).
    max_bytes: optional bound on the bytes under `root`; when a put pushes past it, the least
    recently used entries (oldest mtime; reads touch it) are deleted down to 90% of the bound.
    dtype / overflow / nonfinite: how `put` packs the tensors (see pyfast.pack); by default a
    tensor out of float16 range or with NaN/inf raises instead of being cached.
    """

    def __init__(
        self,
        root,
        fingerprint: str,
        *,
        verify: bool = True,
        max_bytes: int | None = None,
        dtype: torch.dtype = torch.float16,
        overflow: str = "error",
        nonfinite: str = "error",
        fsync: bool = True,
    ):
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(f"fingerprint must be a non-empty str, got {fingerprint!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        if dtype not in PACK_DTYPES:
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.root = os.fspath(root)
        self.fingerprint = fingerprint
        self.verify = bool(verify)
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.overflow = check_choice("overflow", overflow, OVERFLOW_POLICIES)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.fsync = bool(fsync)
        fp_dir = hashlib.blake2b(fingerprint.encode("utf-8"), digest_size=8).hexdigest()
        self.directory = os.path.join(self.root, _LAYOUT, fp_dir)
        os.makedirs(self.directory, exist_ok=True)
        self.stats = CacheStats()
        self._made_dirs: set[str] = set()
        self._approx_bytes: int | None = None  # of everything under root, for max_bytes
        self._written_since_scan = 0

    def __repr__(self) -> str:
        return f"FeatureCache({self.root!r}, fingerprint={self.fingerprint!r}, entries in {self.directory!r})"

    def path(self, key: str) -> str:
        """The entry file of `key` (it may not exist)."""
        name = entry_name(key)
        return os.path.join(self.directory, name[:2], name + SUFFIX)

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    # ---- reading ----

    def get(self, key: str, *, device=None, dtype=None) -> dict[str, torch.Tensor] | None:
        """The tensors stored for `key` on `device` (CPU by default) in `dtype` (the stored
        16-bit dtype by default), or None on a miss. A damaged entry is a miss (and removed)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        try:
            st = os.fstat(fd)
            # A CUDA destination reads straight into pinned memory: the upload needs no staging copy.
            pin = device is not None and torch.device(device).type == "cuda"
            if pin:
                raw = torch.empty(st.st_size, dtype=torch.uint8, pin_memory=True)
                view = memoryview(raw.numpy())
            else:
                array = np.empty(st.st_size, dtype=np.uint8)  # cheaper per call than torch.empty + .numpy()
                raw, view = torch.from_numpy(array), memoryview(array)
            got = 0
            while got < st.st_size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        try:
            if got != st.st_size:
                raise PackedFormatError(f"read {got} of {st.st_size} bytes")
            packed = packed_from_bytes(raw, view)
            self._check(packed, key, view)
        except PackedFormatError as exc:
            self._discard(path, st, exc)
            return None
        self.stats.hits += 1
        self.stats.bytes_read += st.st_size
        if self.max_bytes is not None:
            self._touch(path)
        return packed.unpack(device=device, dtype=dtype)

    def _check(self, packed: Packed, key: str, view: memoryview) -> None:
        meta = packed.metadata
        if meta.get("pyfast.cache") != CACHE_FORMAT_VERSION:
            raise PackedFormatError(f"cache format {meta.get('pyfast.cache')!r}, expected {CACHE_FORMAT_VERSION!r}")
        if meta.get("key") != key:
            raise PackedFormatError("entry holds another key")
        if meta.get("fingerprint") != self.fingerprint:
            raise PackedFormatError("entry holds another fingerprint")
        if self.verify:
            payload = view[len(view) - packed.nbytes :]
            if meta.get("checksum") != checksum(payload, packed.table()):
                raise PackedFormatError("checksum mismatch")

    def _discard(self, path: str, st: os.stat_result, reason: Exception) -> None:
        self.stats.corrupt += 1
        self.stats.misses += 1
        log.warning("pyfast cache: dropping damaged entry %s (%s)", path, reason)
        try:
            # Only the file we read: a writer may have replaced it with a good entry meanwhile.
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _touch(path: str) -> None:
        try:
            os.utime(path)  # mtime is the LRU clock (atime is often off: noatime/relatime)
        except FileNotFoundError:
            pass  # evicted by another process since our read

    # ---- writing ----

    def put(self, key: str, tensors: Mapping[str, torch.Tensor] | Packed) -> int:
        """Stores `tensors` (name -> float tensor, any device) for `key`; returns the bytes written.

        `tensors` may also be a Packed already in the cache's dtype whose statistics are known (e.g.
        one sample's slice of a batch packed once): it is stored as is, without a second cast.
        Raises (and stores nothing) when the values break the overflow/nonfinite policies.
        """
        if isinstance(tensors, Packed):
            packed = self._checked(tensors)
        elif not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping name -> tensor or a Packed, got {type(tensors).__name__}")
        else:
            packed = pack(tensors, dtype=self.dtype, overflow=self.overflow, nonfinite=self.nonfinite)
        path = self.path(key)
        payload = packed.host_bytes()
        meta = {
            "pyfast.cache": CACHE_FORMAT_VERSION,
            "key": key,
            "fingerprint": self.fingerprint,
            "checksum": checksum(payload, packed.table()),
        }
        folder = os.path.dirname(path)
        if folder not in self._made_dirs:
            os.makedirs(folder, exist_ok=True)
            self._made_dirs.add(folder)
        size = _io.atomic_write(path, [packed.header(meta), payload], fsync=self.fsync)
        self.stats.puts += 1
        self.stats.bytes_written += size
        if self.max_bytes is not None:
            self._account(size)
        return size

    def _checked(self, packed: Packed) -> Packed:
        """A ready Packed, checked against this cache's dtype and policies."""
        if packed.dtype != self.dtype:
            raise TypeError(f"Packed holds {packed.dtype} but the cache stores {self.dtype}")
        stats = packed.stats
        if stats is None:
            raise ValueError("a Packed without statistics cannot be checked against the cache's policies")
        names, counts = list(stats), [(s.nonfinite, s.overflow) for s in stats.values()]
        if self.nonfinite == "error" and any(c[0] for c in counts):
            raise ValueError(_policy_error("non-finite values (nonfinite='error')", names, counts, 0, "non-finite"))
        if self.overflow == "error" and any(c[1] for c in counts):
            raise OverflowError(_policy_error("values beyond the range (overflow='error')", names, counts, 1, "out of range"))
        return packed

    # ---- size bound ----

    def _account(self, size: int) -> None:
        """Runs an eviction pass when our estimate of the total passes max_bytes, and also after
        every 10% of max_bytes we wrote: other processes' writes are only seen by a scan, so
        this bounds the overshoot of N concurrent writers to about N * 10% of max_bytes."""
        self._written_since_scan += size
        if self._approx_bytes is not None:
            self._approx_bytes += size
        if (
            self._approx_bytes is None
            or self._approx_bytes > self.max_bytes
            or self._written_since_scan >= self.max_bytes * (1 - _EVICT_TO)
        ):
            self.evict()

    def _entries(self):
        """(mtime_ns, size, path) of every entry under root, all fingerprints."""
        out = []
        layout = os.path.join(self.root, _LAYOUT)
        for dirpath, _dirnames, filenames in os.walk(layout):
            for name in filenames:
                if name.endswith(SUFFIX) and not name.startswith("."):
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue  # evicted or replaced by another process during the walk
                    out.append((st.st_mtime_ns, st.st_size, full))
        return out

    def disk_usage(self) -> int:
        """Bytes of all entries under root (every fingerprint)."""
        return sum(size for _mtime, size, _path in self._entries())

    def evict(self, target_bytes: int | None = None) -> int:
        """Deletes least recently used entries until at most `target_bytes` remain (default: 90%
        of max_bytes when the bound is exceeded). Safe against other processes doing the same:
        a file already gone is skipped; a reader holding it open still reads it whole.
        Also clears temporaries left by crashed writers. Returns the number of entries removed."""
        entries = self._entries()
        total = sum(size for _m, size, _p in entries)
        self._written_since_scan = 0
        if target_bytes is None:
            if self.max_bytes is None or total <= self.max_bytes:
                self._approx_bytes = total
                return 0
            target_bytes = int(self.max_bytes * _EVICT_TO)
        removed = 0
        for _mtime, size, path in sorted(entries):
            if total <= target_bytes:
                break
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
            total -= size
        _io.remove_stale_temporaries(os.path.join(self.root, _LAYOUT))
        self._approx_bytes = total
        self.stats.evicted += removed
        return removed
