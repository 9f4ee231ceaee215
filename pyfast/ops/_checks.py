"""Argument checks shared by the ops (every message names the argument it is about), and the one
place that turns `reduction` and `avg_factor` into what the ops compute."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pyfast._native import FLOAT_DTYPES

REDUCTIONS = ("none", "sum", "mean")
# A zero tensor avg_factor divides by this instead: mmdet's `avg_factor + eps` at zero.
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


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


def check_choice(name: str, value, choices: Sequence[str]) -> str:
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


def check_reduced(op_name: str, reduction: str) -> None:
    """For the ops that return their gradient with the loss: a scalar loss, so one upstream value."""
    if reduction == "none":
        raise ValueError(f'{op_name} takes reduction="sum" or "mean", got "none"')


def reduction_args(reduction, avg_factor) -> tuple[str, float | None, torch.Tensor | None]:
    """(reduction, avg_factor) for an op, and a tensor to divide its result by afterwards.

    avg_factor only means something for reduction="mean" (mmdet's rule); with "sum" or "none" it is
    refused rather than ignored. A number is checked here (> 0) and divides inside the kernel. A
    tensor must hold one element; the op then sums and the result is divided on the device (no host
    sync), see divide_by_avg_factor.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if avg_factor is None:
        return reduction, None, None
    if reduction != "mean":
        raise ValueError(f'avg_factor applies to reduction="mean" only, got reduction={reduction!r}')
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1:
            raise ValueError(f"avg_factor must be a number or a one-element tensor, got shape {tuple(avg_factor.shape)}")
        if avg_factor.is_complex() or avg_factor.dtype == torch.bool:
            raise TypeError(f"avg_factor must be a real number, got a {avg_factor.dtype} tensor")
        return "sum", None, avg_factor
    return "mean", check_number("avg_factor", avg_factor, positive=True), None


def divide_by_avg_factor(total: torch.Tensor, avg_factor: torch.Tensor) -> torch.Tensor:
    """total / avg_factor on the device, for a one-element tensor avg_factor.

    A zero avg_factor (no positives in the batch, say) divides by float32's eps instead, which is
    mmdet's `avg_factor + eps` at zero: a zero summed loss stays 0 and a non-zero one becomes large
    rather than inf. Any avg_factor >= eps divides exactly.
    """
    if avg_factor.device != total.device and avg_factor.device.type != "cpu":
        raise ValueError(f"avg_factor is on {avg_factor.device} but the loss is on {total.device}")
    divisor = avg_factor.reshape(()).to(total.dtype)
    return total / divisor.clamp(min=AVG_FACTOR_EPS)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and return losses in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
