"""The fused cast-and-pack kernel behind pyfast.pack (the Packed container lives in pyfast.cache).

`pack_buffers(tensors, dtype, saturate)` casts a list of float tensors on one device into one
contiguous float16/bfloat16 buffer and returns `(buffer, counts, absmax)`: counts is `(n, 2)`
int64 (non-finite values, overflowing values per tensor) and absmax `(n,)` float64 (max |x| over
the finite values). Both statistics stay on the tensors' device: reading them is the caller's
choice (and, on CUDA, its one host sync). With `out=` (a 1-D tensor of `dtype` on the tensors'
device holding exactly their elements) the values are written into it and `out` is the returned
buffer: no allocation, so none of a fresh buffer's first-touch page faults either. Without it, a
large CPU buffer comes from pyfast/ops/_buffers.py, which reuses the pages of released ones.

Non-contiguous inputs are first copied to a contiguous tensor in their own dtype. That costs one
extra pass for them only; backbone outputs, the common input, are contiguous, and a strided kernel
would need the full stride table per tensor in the kernel's item table.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pyfast import _native
from pyfast.ops import _buffers, reference
from pyfast.ops._checks import check_float_tensor
from pyfast.ops._library import define

PACK_DTYPES = (torch.float16, torch.bfloat16)


def check_pack_inputs(tensors: Sequence[torch.Tensor], dtype, names: Sequence[str] | None = None) -> None:
    """Float tensors on one device and a 16-bit target dtype; messages name the tensor."""
    if dtype not in PACK_DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    for i, t in enumerate(tensors):
        label = f"tensor {names[i]!r}" if names is not None else f"tensors[{i}]"
        check_float_tensor(label, t)
        if t.device != tensors[0].device:
            first = f"tensor {names[0]!r}" if names is not None else "tensors[0]"
            raise ValueError(f"{label} is on {t.device} but {first} is on {tensors[0].device}; pack one device at a time")


def check_pack_out(out, tensors: Sequence[torch.Tensor], dtype) -> None:
    """`out` can take the pack of `tensors` as `dtype`: messages name `out` and what is wrong."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor (or a Packed), got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but the pack's dtype is {dtype}")
    device = tensors[0].device if tensors else out.device
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the tensors are on {device}")
    if out.dim() != 1 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 1-D tensor, got shape {tuple(out.shape)} with strides {out.stride()}")
    total = sum(t.numel() for t in tensors)
    if out.numel() != total:
        raise ValueError(f"out holds {out.numel()} elements but the tensors have {total} in all; it must hold exactly that")
    if out.requires_grad:
        raise ValueError("out requires grad; pass a buffer that does not (packing is not differentiable)")
    start = out.data_ptr()
    end = start + out.numel() * out.element_size()
    for i, t in enumerate(tensors):
        storage = t.untyped_storage()
        t_start = storage.data_ptr()
        if t.numel() and out.numel() and t_start < end and start < t_start + storage.nbytes():
            raise ValueError(f"out shares memory with tensors[{i}]; pack into a separate buffer")


# ---- pyfast::pack_cast and pyfast::pack_cast_into ----


def _pack_native(tensors, *, dtype, saturate):
    check_pack_inputs(tensors, dtype)
    numel, device = sum(t.numel() for t in tensors), tensors[0].device
    buffer = _buffers.empty(numel, dtype, device)  # large on the CPU: pages of an earlier, released buffer
    return (buffer, *_launch(tensors, dtype, saturate, buffer))


def _pack_into_native(tensors, *, dtype, saturate, out):
    check_pack_inputs(tensors, dtype)
    check_pack_out(out, tensors, dtype)
    return _launch(tensors, dtype, saturate, out)


def _launch(tensors, dtype, saturate, buffer):
    """Runs the kernel into `buffer`; returns (counts, absmax)."""
    device = tensors[0].device
    # Held in this list until the kernel returns: a temporary's data_ptr() would dangle.
    sources = [t.contiguous() for t in tensors]
    numels = [t.numel() for t in sources]
    n = len(sources)
    counts = torch.zeros((n, 2), dtype=torch.int64, device=device)
    absmax = torch.zeros((n,), dtype=torch.float64, device=device)
    rows, offset = [], 0
    for t, numel in zip(sources, numels):
        rows.append((t.data_ptr(), numel, offset, int(_native.DTYPES[t.dtype])))
        offset += numel
    # Host memory on every device: the CUDA launch passes the items as kernel parameters (no
    # upload, so the call can be captured in a CUDA graph).
    table = torch.tensor(rows, dtype=torch.int64)
    _native.launch(
        "pack", device, items=table, num_items=n, max_numel=max(numels), out_dtype=_native.DTYPES[dtype],
        saturate=saturate, dst=buffer, counts=counts, absmax=absmax,
    )  # fmt: skip
    return counts, absmax


def _pack_reference(tensors, *, dtype, saturate):
    check_pack_inputs(tensors, dtype)
    return reference.pack_reference(tensors, dtype=dtype, saturate=saturate)


def _pack_into_reference(tensors, *, dtype, saturate, out):
    check_pack_inputs(tensors, dtype)
    check_pack_out(out, tensors, dtype)
    buffer, counts, absmax = reference.pack_reference(tensors, dtype=dtype, saturate=saturate)
    out.copy_(buffer)
    return counts, absmax


def _pack_fake(tensors, *, dtype, saturate):
    first = tensors[0]
    total = sum(t.numel() for t in tensors)
    n = len(tensors)
    return (
        first.new_empty((total,), dtype=dtype),
        first.new_empty((n, 2), dtype=torch.int64),
        first.new_empty((n,), dtype=torch.float64),
    )


def _pack_into_fake(tensors, *, dtype, saturate, out):
    n = len(tensors)
    return out.new_empty((n, 2), dtype=torch.int64), out.new_empty((n,), dtype=torch.float64)


pack_cast = define(
    "pack_cast(Tensor[] tensors, ScalarType dtype, bool saturate) -> (Tensor, Tensor, Tensor)",
    native=_pack_native, reference=_pack_reference, fake=_pack_fake, differentiable=False,
)  # fmt: skip

pack_cast_into = define(
    "pack_cast_into(Tensor[] tensors, ScalarType dtype, bool saturate, Tensor(a!) out) -> (Tensor, Tensor)",
    native=_pack_into_native, reference=_pack_into_reference, fake=_pack_into_fake, differentiable=False,
)  # fmt: skip


def pack_buffers(tensors: Sequence[torch.Tensor], dtype: torch.dtype, saturate: bool, names=None, out=None):
    """Casts `tensors` (one device, any float dtype) into one buffer, `out` when given; see the
    module docstring."""
    check_pack_inputs(list(tensors), dtype, names)
    if out is not None:
        check_pack_out(out, list(tensors), dtype)
    # Packing stores values; it is not differentiable (and the op has no autograd formula).
    tensors = [t.detach() for t in tensors]
    if not tensors:
        device = out.device if out is not None else torch.device("cpu")
        return (
            out if out is not None else torch.empty(0, dtype=dtype),
            torch.zeros((0, 2), dtype=torch.int64, device=device),
            torch.zeros((0,), dtype=torch.float64, device=device),
        )
    if out is not None:
        return (out, *pack_cast_into(tensors, dtype=dtype, saturate=saturate, out=out))
    return pack_cast(tensors, dtype=dtype, saturate=saturate)
