"""Shard files: writing them from packed batches with one buffer, reading them back verified.

A shard is one safetensors file (the `pyfast.pack` format: one 16-bit dtype, tensors back to
back, data 64-byte aligned) holding one tensor per captured layer, shaped (samples, *per-sample
shape), in the layer order of the manifest. Its metadata repeats what identifies it
(`pyfast.capture`, `pyfast.run`, `pyfast.shard`, `pyfast.first`), the per-layer statistics of the
pack (`pyfast.stats`: non-finite count, overflow count, max |x| of the finite values) and the
checksum: xxh3-64 over the data and the tensor table, the feature cache's own
(`pyfast.cache.store.checksum`), also recorded in shards.jsonl.

The writer keeps one shard's buffer and reuses it for every shard: rows are copied in as batches
are packed, and a full shard is written with one writev, atomically. Memory is one shard (at most
`--shard-mb`, or one sample when a sample is larger) whatever the data set size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from pyfast import _io
from pyfast.cache import format as fmt
from pyfast.cache.packed import TensorStats, load_packed
from pyfast.cache.store import checksum
from pyfast.capture.errors import ShardCorruptError
from pyfast.capture.manifest import SHARD_DIR

SHARD_FORMAT_VERSION = "1"
SHARD_SUFFIX = ".safetensors"


def shard_file(index: int) -> str:
    """The shard's path relative to the capture folder."""
    return f"{SHARD_DIR}/shard-{index:06d}{SHARD_SUFFIX}"


@dataclass(frozen=True)
class SampleRecord:
    """What the manifest says about one captured sample."""

    index: int  # in the data set
    key: str
    source: str = ""
    file: str = ""


class _LayerStats:
    __slots__ = ("nonfinite", "overflow", "absmax")

    def __init__(self):
        self.nonfinite = self.overflow = 0
        self.absmax = 0.0

    def add(self, stats: TensorStats) -> None:
        self.nonfinite += stats.nonfinite
        self.overflow += stats.overflow
        self.absmax = max(self.absmax, stats.absmax)


class ShardWriter:
    """Fills shards of `capacity` samples from packed rows and writes each when it is full.

    layers: (name, per-sample shape) in storage order. max_rows: an upper bound on the samples
    still to come (the buffer is never larger than needed for them). pin_memory: page-locked
    buffer, for rows packed on a GPU.
    """

    def __init__(
        self,
        root,
        layers: Sequence[tuple],
        *,
        dtype: torch.dtype,
        capacity: int,
        run_id: str,
        next_shard: int,
        first_sample: int,
        max_rows: int,
        fsync: bool = True,
        pin_memory: bool = False,
    ):
        self.root = os.fspath(root)
        self.names = [name for name, _shape in layers]
        self.shapes = {name: tuple(shape) for name, shape in layers}
        self.elements = {name: math.prod(shape) for name, shape in layers}
        self.dtype = dtype
        self.capacity = int(capacity)
        self.run_id = run_id
        self.shard = int(next_shard)
        self.first_sample = int(first_sample)
        self.fsync = fsync
        self.pin_memory = pin_memory  # rows come from a GPU: page-locked memory makes the copies DMA
        self.rows = max(1, min(self.capacity, int(max_rows)))  # rows the buffer holds per layer
        # layer regions of `rows` rows each, back to back: the layout of a full shard
        self._region, offset = {}, 0
        for name in self.names:
            self._region[name] = offset
            offset += self.rows * self.elements[name]
        self._buffer: Optional[torch.Tensor] = None
        self._total = offset
        self._reset()
        os.makedirs(os.path.join(self.root, SHARD_DIR), exist_ok=True)

    def _reset(self) -> None:
        self.filled = 0
        self.samples: List[SampleRecord] = []
        self.stats: Dict[str, _LayerStats] = {name: _LayerStats() for name in self.names}

    @property
    def room(self) -> int:
        """Samples the current shard still takes."""
        return self.capacity - self.filled

    def _rows_view(self, name: str, start: int, stop: int) -> torch.Tensor:
        base = self._region[name] + start * self.elements[name]
        return self._buffer[base : base + (stop - start) * self.elements[name]].view(stop - start, *self.shapes[name])

    def add(self, tensors: Dict[str, torch.Tensor], stats: Dict[str, TensorStats], samples: Sequence[SampleRecord]) -> Optional[dict]:
        """Copies the rows of one packed chunk (name -> (n, *shape) in the shard dtype, any device)
        into the shard; writes the shard when it is full and returns its entry (else None)."""
        n = len(samples)
        if n > self.room or n > self.rows - self.filled:
            raise ValueError(f"{n} rows do not fit the {self.room} left in shard {self.shard}")
        if self._buffer is None:  # allocated at first use, then reused for every shard
            self._buffer = torch.empty(self._total, dtype=self.dtype, pin_memory=self.pin_memory)
        for name in self.names:
            self._rows_view(name, self.filled, self.filled + n).copy_(tensors[name])
            self.stats[name].add(stats[name])
        self.filled += n
        self.samples.extend(samples)
        if self.filled == self.capacity or self.filled == self.rows:
            return self.write()
        return None

    def write(self) -> Optional[dict]:
        """Writes the current shard (full or the last, partial one); returns its manifest entry."""
        n = self.filled
        if n == 0:
            return None
        entries, offset = {}, 0
        flat = self._buffer.view(torch.int16).numpy()  # int16: numpy has no bfloat16
        for name in self.names:
            count = n * self.elements[name]
            source = self._region[name]
            if n < self.rows and source != offset:
                # a partial shard: move the layer's rows down to close the gap (numpy copies
                # overlapping ranges correctly; regions only ever move towards the start)
                flat[offset : offset + count] = flat[source : source + count]
            entries[name] = (offset, (n, *self.shapes[name]))
            offset += count
        payload = memoryview(flat[:offset]).cast("B")
        table = fmt.table_bytes(self.dtype, entries)
        digest = checksum(payload, table)
        stats = {name: [s.nonfinite, s.overflow, s.absmax] for name, s in self.stats.items()}
        meta = {
            "format": "pt",
            fmt.FORMAT_KEY: fmt.FORMAT_VERSION,
            fmt.DTYPE_KEY: fmt.SAFETENSORS_DTYPES[self.dtype],
            fmt.STATS_KEY: json.dumps(stats, separators=(",", ":")),
            "pyfast.capture": SHARD_FORMAT_VERSION,
            "pyfast.run": self.run_id,
            "pyfast.shard": str(self.shard),
            "pyfast.first": str(self.first_sample),
            "checksum": digest,
        }
        relative = shard_file(self.shard)
        size = _io.atomic_write(os.path.join(self.root, relative), [fmt.encode_header(self.dtype, entries, meta), payload],
                                fsync=self.fsync)
        entry = {
            "shard": self.shard,
            "file": relative,
            "bytes": size,
            "checksum": digest,
            "first": self.first_sample,
            "samples": n,
            "indices": [s.index for s in self.samples],
            "keys": [s.key for s in self.samples],
            "sources": [s.source for s in self.samples],
            "files": [s.file for s in self.samples],
            "stats": {name: {"nonfinite": s[0], "overflow": s[1], "absmax": s[2]} for name, s in stats.items()},
        }
        self.shard += 1
        self.first_sample += n
        self._reset()
        return entry


# ------------------------------------------------------------------ reading


def shard_problem(root, entry: dict, *, verify: bool = False) -> Optional[str]:
    """Why the shard of `entry` cannot be used (missing, other size, damaged), or None.
    Without verify only its presence and size are checked (a stat); with it, every byte."""
    path = os.path.join(os.fspath(root), entry["file"])
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path} is missing"
    if size != entry["bytes"]:
        return f"{path} has {size:,} bytes, the manifest says {entry['bytes']:,}"
    if verify:
        try:
            open_shard(root, entry, verify=True)
        except ShardCorruptError as error:
            return str(error)
    return None


def open_shard(root, entry: dict, *, layers: Optional[Dict[str, tuple]] = None, dtype: Optional[torch.dtype] = None,
               run: Optional[str] = None, verify: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of one shard (name -> (samples, *shape)), views of a copy-on-write memory map.

    Checked against `entry` (its shards.jsonl record) and, when given, the manifest's layers
    (name -> per-sample shape), dtype and run id; verify=True also recomputes the checksum over
    every byte. Any disagreement is a ShardCorruptError naming the file.
    """
    path = os.path.join(os.fspath(root), entry["file"])

    def corrupt(problem: str) -> ShardCorruptError:
        return ShardCorruptError(
            f"{path}: {problem}; the shard is damaged: delete it and rerun the same pyfast-capture command "
            "to capture it again"
        )

    try:
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise corrupt(f"{size:,} bytes, the manifest says {entry['bytes']:,}")
        packed = load_packed(path, mmap=True)
    except FileNotFoundError:
        raise ShardCorruptError(f"{path}: missing; rerun the same pyfast-capture command to capture it again") from None
    except fmt.PackedFormatError as error:
        raise corrupt(str(error)) from None
    meta = packed.metadata
    if meta.get("pyfast.capture") != SHARD_FORMAT_VERSION or meta.get("pyfast.shard") != str(entry["shard"]):
        raise corrupt(f"not shard {entry['shard']} of a pyfast capture")
    if run is not None and meta.get("pyfast.run") != run:
        raise corrupt("it belongs to another capture (its run id differs from the manifest's)")
    if dtype is not None and packed.dtype != dtype:
        raise corrupt(f"dtype {packed.dtype}, the manifest says {dtype}")
    shapes = packed.shapes
    if layers is not None:
        expected = {name: (entry["samples"], *shape) for name, shape in layers.items()}
        if shapes != expected:
            raise corrupt("its tensors are not the manifest's layers and shapes")
    if verify:
        payload = memoryview(packed.buffer.view(torch.uint8).numpy())
        if checksum(payload, packed.table()) != entry["checksum"] or meta.get("checksum") != entry["checksum"]:
            raise corrupt("checksum mismatch")
    return packed.unpack()
