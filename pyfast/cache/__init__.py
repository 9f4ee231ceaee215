"""Packing of features into 16-bit buffers and the on-disk feature cache built on it."""

from pyfast.cache.format import PackedFormatError
from pyfast.cache.packed import Packed, TensorStats, load_packed, pack

__all__ = ["Packed", "PackedFormatError", "TensorStats", "load_packed", "pack"]
