"""`pyfast-info` (or `python -m pyfast.cli.info`): versions, native backends, CUDA architectures, GPUs and threads."""

from __future__ import annotations

import platform
import sys

import torch

import pyfast
from pyfast import _native


def _cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}" if version else "none"


def collect() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "pyfast": pyfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none",
        "native cpu": _native.native_available("cpu"),
        "native cuda": _native.native_available("cuda"),
        # Why not, when not: no build, no driver, or a driver older than the CUDA runtime built in.
        "native cuda unavailable": _native.unavailable_reason("cuda") or "-",
        "cuda archs": ",".join(_native.cuda_archs()) or "none",
        "cuda runtime built in": _cuda_version(getattr(_native._C, "cuda_runtime_version", 0)),
        "native import error": str(_native._IMPORT_ERROR) if _native._IMPORT_ERROR else "none",
        "backend setting": _native.backend_setting(),
        "checked (PYFAST_CHECKED)": _native.checked(),
        "visible GPUs": ", ".join(gpus) or "none",
        "torch threads": torch.get_num_threads(),
    }


def main() -> int:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0 if info["native cpu"] else 1


if __name__ == "__main__":
    sys.exit(main())
