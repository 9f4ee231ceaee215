"""Switching pyfast's backend setting inside a test, and back."""

from __future__ import annotations

import contextlib
import os

from pyfast import _native


@contextlib.contextmanager
def pyfast_env(**values: str):
    """Sets PYFAST_<NAME>=value for each keyword (backend="reference", checked="1"), re-reads the
    settings (which re-registers the kernels) and restores both afterwards."""
    saved = {}
    for key, value in values.items():
        name = f"PYFAST_{key.upper()}"
        saved[name] = os.environ.get(name)
        os.environ[name] = value
    try:
        _native.reload_backend_setting()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _native.reload_backend_setting()
