"""Large CPU output buffers that are used again once nothing refers to them.

A fresh allocation of several MB is mapped anew by the C library, and the kernel zero-fills every
page on its first touch: for a 32 MB pack output that costs about as much as the cast itself (2-3
ms here, measured against the same cast into an existing buffer), and it recurs on every call,
because the C library maps requests of that size afresh each time. The ops' outputs of
`MIN_BYTES` and more come from here instead: a byte array from this pool, wrapped without a copy
(`torch.from_numpy`). torch's storage keeps a reference to the array while any tensor or view of
it lives, so an array that only the pool still refers to is free, and the next request that fits
takes it, its pages already in place. The pool holds at most `MAX_BYTES` (least recently handed
out dropped first); `release()` drops every free array.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import torch

MIN_BYTES = 4 << 20  # below, the C library's own reuse of freed memory does as well
MAX_BYTES = 512 << 20
_arrays: list[np.ndarray] = []  # least recently handed out first
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy locked for good.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def empty(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized 1-D tensor of `numel` elements of `dtype`, from the pool when large and on
    the CPU (elsewhere, torch.empty)."""
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_BYTES or torch.device(device).type != "cpu":  # the size first: it is the cheaper test
        return torch.empty(numel, dtype=dtype, device=device)
    return _from_pool(nbytes, dtype)


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous torch.empty_like(tensor), from the pool when large and on the CPU."""
    # Small outputs (every op's on a few thousand boxes) take torch.empty_like directly: going
    # through empty() and a view costs ~4 us more per call.
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < MIN_BYTES or tensor.device.type != "cpu":
        return torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _from_pool(nbytes, tensor.dtype).view(tensor.shape)


def _from_pool(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor of `dtype` over nbytes of a pooled array."""
    with _lock:
        array = _take(nbytes)
    return torch.from_numpy(array[:nbytes]).view(dtype)


def release() -> int:
    """Drops the arrays nothing else refers to; returns the bytes given back."""
    with _lock:
        free = [i for i in range(len(_arrays)) if _is_free(i)]
        freed = sum(_arrays[i].nbytes for i in free)
        for i in reversed(free):
            del _arrays[i]
    return freed


def pooled_bytes() -> int:
    """Bytes the pool holds, in use or free."""
    with _lock:
        return sum(a.nbytes for a in _arrays)


def _is_free(i: int) -> bool:
    # References: the pool's list and getrefcount's argument. A tensor (or a view of one) holds
    # the slice it was made from, which holds the array.
    return sys.getrefcount(_arrays[i]) == 2


def _take(nbytes: int) -> np.ndarray:
    """The smallest free array of nbytes to 2 * nbytes (moved to the end), or a new one."""
    best = None
    for i in range(len(_arrays)):
        size = _arrays[i].nbytes
        if nbytes <= size <= 2 * nbytes and _is_free(i) and (best is None or size < _arrays[best].nbytes):
            best = i
    if best is not None:
        array = _arrays.pop(best)
    else:
        array = np.empty(nbytes, dtype=np.uint8)
    _arrays.append(array)
    total = sum(a.nbytes for a in _arrays)
    while total > MAX_BYTES and len(_arrays) > 1:
        total -= _arrays.pop(0).nbytes  # in use or not: a dropped array lives on with its tensors
    return array
