"""The fused cast-and-pack kernel behind pyfast.pack (the Packed container lives in pyfast.cache).

`pack_buffers(tensors, dtype, saturate)` casts a list of float tensors on one device into one
contiguous float16/bfloat16 buffer and returns `(buffer, counts, absmax)`: counts is `(n, 2)`
int64 (non-finite values, overflowing values per tensor) and absmax `(n,)` float64 (max |x| over
the finite values). Both statistics stay on the tensors' device: reading them is the caller's
choice (and, on CUDA, its one host sync).

Non-contiguous inputs are first copied to a contiguous tensor in their own dtype. That costs one
extra pass for them only; backbone outputs, the common input, are contiguous, and a strided kernel
would need the full stride table per tensor in the kernel's item table.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pyfast import _native
from pyfast.ops import reference
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


# ---- pyfast::pack_cast ----


def _pack_native(tensors, *, dtype, saturate):
    check_pack_inputs(tensors, dtype)
    device = tensors[0].device
    # Held in this list until the kernel returns: a temporary's data_ptr() would dangle.
    sources = [t.contiguous() for t in tensors]
    numels = [t.numel() for t in sources]
    n = len(sources)
    buffer = torch.empty(sum(numels), dtype=dtype, device=device)
    counts = torch.zeros((n, 2), dtype=torch.int64, device=device)
    absmax = torch.zeros((n,), dtype=torch.float64, device=device)
    rows, offset = [], 0
    for t, numel in zip(sources, numels):
        rows.append((t.data_ptr(), numel, offset, int(_native.DTYPES[t.dtype])))
        offset += numel
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # The item table goes up through pinned memory, ordered on the current stream: no sync.
        table = table.pin_memory().to(device, non_blocking=True)
    _native.launch(
        "pack", device, items=table, num_items=n, max_numel=max(numels), out_dtype=_native.DTYPES[dtype],
        saturate=saturate, dst=buffer, counts=counts, absmax=absmax,
    )  # fmt: skip
    return buffer, counts, absmax


def _pack_reference(tensors, *, dtype, saturate):
    check_pack_inputs(tensors, dtype)
    return reference.pack_reference(tensors, dtype=dtype, saturate=saturate)


def _pack_fake(tensors, *, dtype, saturate):
    first = tensors[0]
    total = sum(t.numel() for t in tensors)
    n = len(tensors)
    return (
        first.new_empty((total,), dtype=dtype),
        first.new_empty((n, 2), dtype=torch.int64),
        first.new_empty((n,), dtype=torch.float64),
    )


pack_cast = define(
    "pack_cast(Tensor[] tensors, ScalarType dtype, bool saturate) -> (Tensor, Tensor, Tensor)",
    native=_pack_native, reference=_pack_reference, fake=_pack_fake, differentiable=False,
)  # fmt: skip


def pack_buffers(tensors: Sequence[torch.Tensor], dtype: torch.dtype, saturate: bool, names=None):
    """Casts `tensors` (one device, any float dtype) into one buffer; see the module docstring."""
    check_pack_inputs(list(tensors), dtype, names)
    # Packing stores values; it is not differentiable (and the op has no autograd formula).
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return (
            torch.empty(0, dtype=dtype),
            torch.zeros((0, 2), dtype=torch.int64),
            torch.zeros((0,), dtype=torch.float64),
        )
    return pack_cast(tensors, dtype=dtype, saturate=saturate)
