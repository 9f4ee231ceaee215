"""pyfast.pack, Packed and pyfast.load_packed: many float tensors as one 16-bit buffer.

`pack` runs the fused kernel (pyfast.ops.pack) and applies the policies: by default a tensor with
non-finite values raises ValueError and one with values beyond the 16-bit range raises
OverflowError, each naming the tensors and counts. Applying an "error" policy needs the counts on
the host: on CUDA that is the one host sync of `pack` (none happens when both policies are
non-raising; the statistics are then read on first access to `Packed.stats`).
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from pyfast import _io
from pyfast.cache import format as fmt
from pyfast.ops._checks import check_choice
from pyfast.ops.pack import PACK_DTYPES, pack_buffers

OVERFLOW_POLICIES = ("error", "saturate")
NONFINITE_POLICIES = ("error", "keep")


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor statistics of a pack: non-finite values, overflowing values (finite but beyond
    the 16-bit range), and max |x| over the finite values of the source tensor."""

    nonfinite: int
    overflow: int
    absmax: float


def _normalize_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Packed:
    """One contiguous float16/bfloat16 buffer holding named tensors back to back.

    Build one with `pyfast.pack` or `pyfast.load_packed`. `buffer` is the flat 1-D tensor,
    `unpack()` the named views, `stats` the per-tensor statistics (None for a file that did not
    record them), `metadata` the string pairs stored with a file.
    """

    __slots__ = ("buffer", "_entries", "_counts", "_absmax", "_stats", "metadata")

    def __init__(self, buffer: torch.Tensor, entries: dict, *, counts=None, absmax=None, stats=None, metadata=None):
        self.buffer = buffer
        self._entries = entries  # name -> (offset in elements, shape)
        self._counts, self._absmax = counts, absmax
        self._stats = stats
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the file adds its header)."""
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (_offset, shape) in self._entries.items()}

    @property
    def stats(self) -> dict[str, TensorStats] | None:
        if self._stats is None and self._counts is None and fmt.STATS_KEY in self.metadata:
            # Parsed on first use: a cache read does not need them.
            self._stats = _stats_from_metadata(self.metadata, self._entries)
        if self._stats is None and self._counts is not None:
            counts = self._counts.tolist()  # on CUDA: a host sync, on first access only
            absmax = self._absmax.tolist()
            self._stats = {
                name: TensorStats(int(c[0]), int(c[1]), float(a)) for name, c, a in zip(self._entries, counts, absmax)
            }
            self._counts = self._absmax = None
        return self._stats

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Packed({len(self)} tensors, {self.nbytes} bytes, {self.dtype}, {self.device})"

    def unpack(self, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """name -> tensor. Views of `buffer` when neither device nor dtype changes anything.

        A move to CUDA goes through pinned memory with a non-blocking copy on the current stream
        (the whole buffer at once, in 16 bits), and the cast, when asked for, runs after the move
        (on the device), so no per-tensor copies or casts happen.
        """
        buf = self.buffer
        if device is not None:
            device = _normalize_device(device)
            if device != buf.device:
                if device.type == "cuda" and buf.device.type == "cpu":
                    host = buf if buf.is_pinned() else buf.pin_memory()
                    buf = host.to(device, non_blocking=True)
                else:
                    buf = buf.to(device)
        if dtype is not None and dtype != buf.dtype:
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
            buf = buf.to(dtype)
        return {name: buf[offset : offset + math.prod(shape)].view(shape) for name, (offset, shape) in self._entries.items()}

    def header(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """The safetensors header (length prefix + JSON) that `save` writes before the buffer."""
        meta = {"format": "pt", fmt.FORMAT_KEY: fmt.FORMAT_VERSION, fmt.DTYPE_KEY: fmt.SAFETENSORS_DTYPES[self.dtype]}
        meta.update(self.metadata)  # a loaded file's metadata first: fresh statistics replace its own
        stats = self.stats
        if stats is not None:
            meta[fmt.STATS_KEY] = json.dumps(
                {n: [s.nonfinite, s.overflow, s.absmax] for n, s in stats.items()}, separators=(",", ":")
            )
        if metadata:
            for key, value in metadata.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
            meta.update(metadata)
        return fmt.encode_header(self.dtype, self._entries, meta)

    def host_bytes(self) -> memoryview:
        """The buffer's bytes on the host (a copy only when the buffer lives on a device)."""
        buf = self.buffer if self.buffer.device.type == "cpu" else self.buffer.cpu()
        return memoryview(buf.contiguous().view(torch.uint8).numpy())

    def table(self) -> bytes:
        """Canonical bytes of the tensor table, covered by the cache's checksum."""
        return fmt.table_bytes(self.dtype, self._entries)

    def save(self, path, *, metadata: Mapping[str, str] | None = None, fsync: bool = True) -> int:
        """Writes header + buffer as one safetensors file (one writev, atomically); returns its size."""
        return _io.atomic_write(os.fspath(path), [self.header(metadata), self.host_bytes()], fsync=fsync)


def _named(tensors) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(tensors, Mapping):
        names = list(tensors)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r}")
            if name == fmt.META_KEY:
                raise ValueError(f"{fmt.META_KEY!r} is reserved by the safetensors format and cannot name a tensor")
        return names, list(tensors.values())
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a mapping name -> tensor or a sequence of tensors, got {type(tensors).__name__}")
    return [str(i) for i in range(len(tensors))], list(tensors)


def _policy_error(kind: str, names, counts, column: int, what: str) -> str:
    bad = [(n, c[column]) for n, c in zip(names, counts) if c[column]]
    listed = ", ".join(f"{n!r} ({c} {what})" for n, c in bad[:5])
    more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    return f"{kind}: {listed}{more}"


def pack(
    tensors, *, dtype: torch.dtype = torch.float16, overflow: str = "error", nonfinite: str = "error", out=None
) -> Packed:
    """Casts `tensors` (a mapping name -> tensor, or a sequence named "0", "1", ...; any float
    dtype, one device, contiguous or not) into one contiguous float16/bfloat16 buffer.

    In-range values are bit-identical to `tensor.to(dtype)`. overflow="error" raises OverflowError
    for finite values beyond the range of `dtype`; "saturate" stores them as +-max.
    nonfinite="error" raises ValueError for NaN/inf; "keep" stores them.

    out: a Packed from an earlier pack, or a contiguous 1-D tensor of `dtype` on the tensors'
    device, holding exactly as many elements as `tensors`: the values are written into it instead
    of a new buffer (without it, a large CPU buffer reuses the pages of a released one:
    pyfast/ops/_buffers.py). A Packed `out` is updated to describe the new tensors and returned; a tensor `out`
    becomes the returned Packed's buffer. Its contents are overwritten even when a policy raises.
    """
    names, values = _named(tensors)
    check_choice("overflow", overflow, OVERFLOW_POLICIES)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    if dtype not in PACK_DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    target = out if isinstance(out, Packed) else None
    out_buffer = target.buffer if target is not None else out
    buffer, counts, absmax = pack_buffers(values, dtype, overflow == "saturate", names=names, out=out_buffer)
    entries, offset = {}, 0
    for name, t in zip(names, values):
        entries[name] = (offset, tuple(t.shape))
        offset += t.numel()
    if target is None:
        packed = Packed(buffer, entries, counts=counts, absmax=absmax)
    else:
        packed = target
        packed._entries, packed._counts, packed._absmax, packed._stats = entries, counts, absmax, None
        packed.metadata = {}
    if overflow == "error" or nonfinite == "error":
        host = counts.tolist()  # the one host sync of a CUDA pack, needed to raise
        if nonfinite == "error" and any(c[0] for c in host):
            raise ValueError(_policy_error("non-finite values (nonfinite='error')", names, host, 0, "non-finite"))
        if overflow == "error" and any(c[1] for c in host):
            top = torch.finfo(dtype).max
            raise OverflowError(
                _policy_error(f"values beyond the {dtype} range +-{top:g} (overflow='error')", names, host, 1, "out of range")
            )
    return packed


def _stats_from_metadata(metadata: dict, names) -> dict[str, TensorStats] | None:
    text = metadata.get(fmt.STATS_KEY)
    if text is None:
        return None
    try:
        raw = json.loads(text)
        return {n: TensorStats(int(raw[n][0]), int(raw[n][1]), float(raw[n][2])) for n in names}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise fmt.PackedFormatError(f"{fmt.STATS_KEY} metadata is malformed: {exc}") from None


def packed_from_bytes(raw: torch.Tensor, view: memoryview | None = None) -> Packed:
    """A Packed over `raw` (a uint8 tensor holding a whole file); views, no copy when aligned.
    `view` may pass a memoryview of `raw` the caller already has (saves a conversion per read)."""
    if view is None:
        view = memoryview(raw.numpy())
    size = len(view)
    n = fmt.header_length(view, size)
    start = 8 + n
    dtype, entries, metadata = fmt.decode_header(view[8:start], size - start)
    data = raw[start:]
    if start % 2:  # a foreign writer's odd header: a 16-bit view needs an even offset
        data = data.clone()
    return Packed(data.view(dtype), entries, metadata=metadata)


def load_packed(path, mmap: bool = True) -> Packed:
    """Reads a file written by `Packed.save` (or any safetensors file of one 16-bit dtype).

    mmap=True maps the file copy-on-write: tensors are views of the page cache, read lazily, and
    writing to them never changes the file. mmap=False reads it into memory.
    Raises PackedFormatError (a ValueError) for a file that is not such a safetensors file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if mmap and size > 0:
            mapped = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
            raw = torch.frombuffer(mapped, dtype=torch.uint8)
        else:
            raw = torch.empty(size, dtype=torch.uint8)
            if _io.read_all(path, raw.numpy()) != size:
                raise fmt.PackedFormatError(f"{path}: file changed size while being read")
    return packed_from_bytes(raw)
