"""Argument checks shared by the ops: every message names the argument it is about."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pyfast._native import FLOAT_DTYPES

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value) -> torch.Tensor:
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def check_same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; they must share a device")


def check_choice(name: str, value, choices: Sequence[str] | dict) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_number(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_avg_factor(value):
    """None, a positive number, or a tensor (used as a divisor on the device, with no host sync)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return check_number("avg_factor", value, positive=True)


def mean_scale(n: int, reduction: int, avg_factor) -> float:
    """The factor the kernels multiply the summed loss by: 1 / (avg_factor or N) for mean, else 1."""
    if reduction != REDUCTIONS["mean"]:
        return 1.0
    return 1.0 / (avg_factor if avg_factor is not None else max(n, 1))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and return losses in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
