"""Packing of features into 16-bit buffers and the on-disk feature cache built on it."""

from pyfast.cache.format import PackedFormatError
from pyfast.cache.keys import bytes_key, file_key, make_fingerprint, module_digest
from pyfast.cache.packed import Packed, TensorStats, load_packed, pack
from pyfast.cache.store import CacheStats, FeatureCache

__all__ = [
    "CacheStats",
    "FeatureCache",
    "Packed",
    "PackedFormatError",
    "TensorStats",
    "bytes_key",
    "file_key",
    "load_packed",
    "make_fingerprint",
    "module_digest",
    "pack",
]
