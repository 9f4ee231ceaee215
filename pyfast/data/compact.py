"""Compact, fork-friendly storage of many strings or byte strings: one numpy buffer plus offsets.

DataLoader workers are forked from the main process. A Python list of str (or a dict of COCO
annotations) is touched on every access (reference counts), so each worker slowly copies every
page it lives on and memory grows with workers x epochs. A numpy buffer is one object whose pages
stay shared.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class PackedBytes:
    """An immutable sequence of bytes objects stored as one uint8 buffer and int64 offsets."""

    def __init__(self, items: Iterable[bytes]):
        items = list(items)
        lengths = np.fromiter((len(item) for item in items), dtype=np.int64, count=len(items))
        self._offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(items), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _slice(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes()

    def __getitem__(self, index: int) -> bytes:
        return self._slice(index)

    @property
    def nbytes(self) -> int:
        return int(self._buffer.nbytes + self._offsets.nbytes)


class PackedStrings(PackedBytes):
    """An immutable sequence of str, stored UTF-8 encoded in one buffer."""

    def __init__(self, items: Iterable[str]):
        super().__init__(item.encode("utf-8") for item in items)

    def __getitem__(self, index: int) -> str:
        return self._slice(index).decode("utf-8")
