"""The on-disk format of a Packed buffer: a safetensors file.

Layout (the safetensors spec): 8 bytes little-endian header length N, N bytes of JSON, then the
data. The JSON maps each tensor name to its dtype, shape and [begin, end) byte offsets into the
data, plus an optional "__metadata__" of string pairs. A Packed writes one 16-bit dtype, tensors
back to back in order (safetensors forbids holes), and pads the header with spaces so that the
data starts on a 64-byte boundary (mmap'd views stay aligned).

Any safetensors file whose tensors all share one 16-bit dtype (F16 or BF16) parses here too;
files with other dtypes are refused with a message pointing to safetensors.torch.load_file,
because a Packed is one buffer of one dtype.
"""

from __future__ import annotations

import json
import math
import struct

import torch

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES_BY_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}
ITEMSIZE = 2  # both packed dtypes
META_KEY = "__metadata__"
FORMAT_KEY = "pyfast.packed"
FORMAT_VERSION = "1"
DTYPE_KEY = "pyfast.dtype"
STATS_KEY = "pyfast.stats"
_ALIGN = 64
# A header larger than this is not one we wrote and would only cost memory to parse.
MAX_HEADER_BYTES = 64 << 20


class PackedFormatError(ValueError):
    """The bytes are not a safetensors file that a Packed can hold (or they are damaged)."""


def encode_header(dtype: torch.dtype, entries: dict, metadata: dict[str, str]) -> bytes:
    """The 8-byte length + padded JSON header for `entries` (name -> (offset, shape), in elements)."""
    itemsize = ITEMSIZE
    header: dict = {META_KEY: metadata} if metadata else {}
    name = SAFETENSORS_DTYPES[dtype]
    for key, (offset, shape) in entries.items():
        numel = math.prod(shape)
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset * itemsize, (offset + numel) * itemsize]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = len(text) + (-(8 + len(text)) % _ALIGN)
    return struct.pack("<Q", padded) + text + b" " * (padded - len(text))


def header_length(prefix, file_size: int) -> int:
    """N from the first 8 bytes of a file of `file_size` bytes (`prefix`: any bytes-like object)."""
    if file_size < 8 or len(prefix) < 8:
        raise PackedFormatError(f"file too short for a safetensors header ({file_size} bytes)")
    (n,) = struct.unpack_from("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise PackedFormatError(f"header length {n} does not fit a {file_size}-byte file")
    return n


def decode_header(text: bytes, data_bytes: int):
    """Validates a header against the size of the data that follows it.

    Returns (dtype, entries name -> (offset, shape) in elements, metadata). Raises
    PackedFormatError for anything a writer of this format could not have produced: unknown or
    mixed dtypes, shapes that disagree with offsets, holes, overlaps, or data of another size.
    """
    try:
        header = json.loads(bytes(text))  # bytes: json detects and checks the UTF-8 itself
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackedFormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PackedFormatError("header is not a JSON object")
    metadata = header.pop(META_KEY, None) or {}
    # JSON object keys are always str; only the values need a look.
    if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
        raise PackedFormatError("__metadata__ must map strings to strings")
    dtype_names = set()
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise PackedFormatError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise PackedFormatError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise PackedFormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        dtype_names.add(info["dtype"])
        spans.append((offsets[0], offsets[1], name, tuple(shape)))
    if not dtype_names:
        dtype_names.add(metadata.get(DTYPE_KEY, "F16"))
    if len(dtype_names) > 1 or not dtype_names <= set(DTYPES_BY_NAME):
        raise PackedFormatError(
            f"a Packed holds one 16-bit dtype (F16 or BF16) but the file has {sorted(dtype_names)}; "
            "read it with safetensors.torch.load_file instead"
        )
    dtype = DTYPES_BY_NAME[dtype_names.pop()]
    itemsize = ITEMSIZE
    spans.sort()
    position = 0
    for begin, end, name, shape in spans:
        if begin != position:
            raise PackedFormatError(f"tensor {name!r}: data starts at byte {begin}, expected {position} (hole or overlap)")
        if end - begin != math.prod(shape) * itemsize:
            raise PackedFormatError(f"tensor {name!r}: {end - begin} bytes do not hold shape {list(shape)}")
        position = end
    if position != data_bytes:
        raise PackedFormatError(f"tensors cover {position} bytes but the file holds {data_bytes} bytes of data")
    order = {name: i for i, name in enumerate(header)}
    entries = {
        name: (begin // itemsize, shape) for begin, _end, name, shape in sorted(spans, key=lambda s: order[s[2]])
    }
    return dtype, entries, metadata


def table_bytes(dtype: torch.dtype, entries: dict) -> bytes:
    """A canonical description of the tensor table (dtype, names, offsets, shapes), for checksums.

    `entries` maps str -> (int, tuple of ints) on both the writing and the reading side, so its
    repr is canonical (and much cheaper than a JSON encoding on every cache read)."""
    return f"{SAFETENSORS_DTYPES[dtype]}{list(entries.items())!r}".encode("utf-8")
