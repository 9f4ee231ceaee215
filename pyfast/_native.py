"""The native module and the choice of backend.

`pyfast._C` holds the kernels (CPU always, CUDA when the build found nvcc). Each op asks
`use_native(device_type)`: without a native backend for that device, or with
`PYFAST_BACKEND=reference`, the op runs its pure-PyTorch twin from `pyfast.ops.reference`
instead, and says so once.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    from pyfast import _C
except ImportError as exc:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

# Must match csrc/common/types.h::DType.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)

_BACKENDS = ("auto", "native", "reference")
_warned: set[str] = set()


def backend_setting() -> str:
    """The value of PYFAST_BACKEND: auto (default), native or reference."""
    value = os.environ.get("PYFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"PYFAST_BACKEND must be one of {', '.join(_BACKENDS)}, got {value!r}")
    return value


_setting = backend_setting()


def reload_backend_setting() -> str:
    """Re-read PYFAST_BACKEND (it is read once at import so hot paths do not touch os.environ)."""
    global _setting
    _setting = backend_setting()
    _warned.clear()
    return _setting


def native_available(device_type: str) -> bool:
    """Whether native kernels for `device_type` ("cpu" or "cuda") were built into pyfast._C."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.with_cuda)
    return False


def cuda_archs() -> list[str]:
    """The CUDA architectures compiled into pyfast._C (empty without CUDA)."""
    if _C is None or not _C.with_cuda:
        return []
    return [a for a in str(_C.cuda_archs).split(",") if a]


def use_native(device_type: str) -> bool:
    """True when the op should call the native kernel for tensors on `device_type`."""
    if _setting == "reference":
        return False
    if native_available(device_type):
        return True
    if _setting == "native":
        raise RuntimeError(
            f"PYFAST_BACKEND=native but pyfast has no native {device_type} backend"
            + (f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else "")
        )
    if device_type not in _warned:
        _warned.add(device_type)
        reason = f"pyfast._C failed to import: {_IMPORT_ERROR}" if _IMPORT_ERROR else "it was not built"
        warnings.warn(
            f"pyfast: no native {device_type} backend ({reason}); using the PyTorch reference ops, "
            "which are correct but slower",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def num_threads() -> int:
    """Threads for the CPU kernels: torch's own setting, so torch.set_num_threads applies."""
    return torch.get_num_threads()


def cuda_stream(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream on `device`, for a kernel launch."""
    return torch.cuda.current_stream(device).cuda_stream
