"""The native module pyfast._C: whether it is there for a device, the backend setting, and the one
way to launch its kernels.

`pyfast._C` holds the kernels (CPU always, CUDA when the build found nvcc). Each op registers its
native kernels with the dispatcher for the devices where `use_native(device_type)` holds, and its
pure-PyTorch twin (pyfast.ops.reference) as the fallback for every other device; see
pyfast/ops/_library.py. `PYFAST_BACKEND=reference` registers no native kernel, `native` makes a
missing one an error. The setting is read at import; `reload_backend_setting()` reads it (and
`PYFAST_CHECKED`) again and re-registers the kernels.

The enums the kernels take (dtypes, box modes, reductions, ...) are read from `_C` by name; nothing
here repeats their values.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

try:
    from pyfast import _C
except ImportError as exc:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# torch dtype -> _C.DType, matched by name (the kernels' storage types, uint8 for binary masks).
DTYPES = {} if _C is None else {getattr(torch, name): value for name, value in _C.DType.__members__.items()}

_BACKENDS = ("auto", "native", "reference")
_setting = "auto"
_checked = False
_listeners: list[Callable[[], None]] = []


def backend_setting() -> str:
    """The value of PYFAST_BACKEND: auto (default), native or reference."""
    value = os.environ.get("PYFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"PYFAST_BACKEND must be one of {', '.join(_BACKENDS)}, got {value!r}")
    return value


def checked() -> bool:
    """PYFAST_CHECKED=1: the CUDA ops also raise on input errors their kernels detect (float mask
    targets outside [0, 1]), at the cost of a host sync per call; the CPU ops always do."""
    return _checked


def reload_backend_setting() -> str:
    """Re-read PYFAST_BACKEND and PYFAST_CHECKED (read once at import, so that hot paths do not
    touch os.environ) and re-register the kernels accordingly."""
    global _setting, _checked
    _setting = backend_setting()
    _checked = os.environ.get("PYFAST_CHECKED", "").strip().lower() in ("1", "true", "yes", "on")
    for listener in _listeners:
        listener()
    return _setting


def on_reload(listener: Callable[[], None]) -> None:
    """Calls `listener` after every reload_backend_setting() (the kernel registrations)."""
    _listeners.append(listener)


def _probe_cuda_driver() -> int:
    """cudaDriverGetVersion, e.g. 13000 for a driver that supports CUDA 13.0; 0 without a driver."""
    return _C.cuda_driver_version()


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def unavailable_reason(device_type: str) -> str | None:
    """Why pyfast._C has no usable kernels for `device_type`, or None when it has."""
    if _C is None:
        return f"pyfast._C failed to import: {_IMPORT_ERROR}"
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"pyfast._C has no {device_type} kernels"
    if not _C.with_cuda:
        return "pyfast._C was built without CUDA kernels (no nvcc at build time, or PYFAST_CUDA=OFF)"
    driver, runtime = _probe_cuda_driver(), _C.cuda_runtime_version
    if driver == 0:
        return "no CUDA driver was found"
    if driver < runtime:
        return (
            f"the CUDA driver supports CUDA {_cuda_version_text(driver)}, older than the CUDA "
            f"{_cuda_version_text(runtime)} runtime pyfast._C was built with: update the driver, or build "
            "pyfast with the CUDA toolkit the driver supports"
        )
    return None


def native_available(device_type: str) -> bool:
    """Whether pyfast._C has kernels for `device_type` ("cpu" or "cuda") that can run here."""
    return unavailable_reason(device_type) is None


def use_native(device_type: str) -> bool:
    """Whether the ops register their native kernels for `device_type` under the current setting."""
    return _setting != "reference" and native_available(device_type)


def cuda_archs() -> list[str]:
    """The CUDA architectures compiled into pyfast._C (empty without CUDA)."""
    if _C is None or not _C.with_cuda:
        return []
    return [a for a in str(_C.cuda_archs).split(",") if a]


# Each native kernel and the _C struct that carries its arguments.
_ARGS = {
    "box_loss_forward": "BoxLossForward",
    "box_loss_backward": "BoxLossBackward",
    "mask_loss_forward": "MaskLossForward",
    "mask_loss_backward": "MaskLossBackward",
    "mask_iou": "MaskIoU",
    "pack": "PackArgs",
}
_resolved: dict[str, Callable] = {}


def _c(name: str) -> Callable:
    value = _resolved.get(name)
    if value is None:
        value = _resolved[name] = getattr(_C, name)
    return value


def launch(kernel: str, device: torch.device, **fields):
    """Runs native kernel `kernel` ("box_loss_forward", ...) on `device` with its argument struct
    built from `fields` (every field by name; see csrc/bindings.cpp), and returns what the kernel
    returns.

    CPU: torch's thread count (so torch.set_num_threads applies). CUDA: the kernel makes `device`
    current for the launch, runs on its current torch stream (ordered with the surrounding torch
    work, no sync) and gets the scratch memory it asks for from torch's caching allocator.
    """
    args = _c(_ARGS[kernel])(**fields)
    if device.type == "cpu":
        return _c(kernel + "_cpu")(args, threads=torch.get_num_threads())
    name = kernel + "_" + device.type
    size = _c(name + "_workspace")(args)
    workspace = torch.empty(size, dtype=torch.uint8, device=device) if size else None
    return _c(name)(
        args,
        device=device.index,
        stream=torch.cuda.current_stream(device).cuda_stream,
        workspace=0 if workspace is None else workspace.data_ptr(),
    )


reload_backend_setting()
