"""The `pyfast` torch.library namespace shared by all ops."""

from __future__ import annotations

import torch

LIB = torch.library.Library("pyfast", "FRAGMENT")


def impl_cpu_cuda(op_name: str):
    """Registers the decorated function as the CPU and CUDA kernel of `pyfast::op_name`."""

    def register(fn):
        LIB.impl(op_name, fn, "CPU")
        LIB.impl(op_name, fn, "CUDA")
        return fn

    return register
