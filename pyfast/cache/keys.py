"""Fingerprints (what produced the features) and keys (which sample they belong to).

A cache entry is valid only for one (fingerprint, key) pair. The fingerprint must change whenever
the features would: the extractor's class and weights, the input size, the preprocessing, the
storage dtype. The key must name the sample by what it is, never by where this machine keeps it:
a path relative to the data root plus size and mtime, or a hash of the content. An absolute path
or a device in a key makes a moved data folder or a second GPU miss every time.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from pathlib import PurePath
from typing import Mapping

import torch
import xxhash

# Bumped when the meaning of a fingerprint changes (so old caches stop matching).
FINGERPRINT_VERSION = 1


def _canonical(value, where: str):
    """JSON-able form of a preprocessing parameter; unknown types are an error, not a repr
    (a repr with an object address would change the fingerprint on every run)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (torch.dtype, torch.device, PurePath, enum.Enum)):
        return str(value)
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {k!r}")
            out[k] = _canonical(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest(value)}
    raise TypeError(
        f"{where}: cannot fingerprint a {type(value).__name__}; pass numbers, strings, lists, dicts, dtypes or tensors"
    )


def tensor_digest(t: torch.Tensor) -> str:
    """xxh3-128 of a tensor's dtype, shape and bytes (device-independent)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    h = xxhash.xxh3_128(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(data)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Class, parameter and buffer names, dtypes, shapes and bytes of `module`."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    cls = type(module)
    h = hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}".encode())
    state = module.state_dict(keep_vars=False)
    for name in sorted(state):
        value = state[name]
        digest = tensor_digest(value) if isinstance(value, torch.Tensor) else repr(_canonical(value, name))
        h.update(f"\n{name}={digest}".encode())
    return h.hexdigest()


def make_fingerprint(module: torch.nn.Module | None = None, params: Mapping | None = None, **more) -> str:
    """A short hex string naming what produced the features.

    module: the (frozen) feature extractor; its class and every parameter and buffer are hashed.
    params / **more: everything else that shapes the features: input size, normalization,
    resize mode, layer taken, storage dtype... Values may be numbers, strings, lists, dicts,
    dtypes, paths or tensors; anything else raises TypeError.
    """
    merged = dict(params or {})
    overlap = set(merged) & set(more)
    if overlap:
        raise ValueError(f"parameters given twice (in params and as keywords): {sorted(overlap)}")
    merged.update(more)
    description = {
        "version": FINGERPRINT_VERSION,
        "module": module_digest(module) if module is not None else None,
        "params": _canonical(merged, "params"),
    }
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def file_key(path, root, *, content: bool = False) -> str:
    """The key of the sample stored in file `path` under the data folder `root`.

    By default: the path relative to `root` (with '/' separators) plus size and mtime, so the key
    survives moving or mounting the folder elsewhere and changes when the file is rewritten.
    content=True hashes the bytes instead of trusting size and mtime (survives copies that reset
    mtimes; costs a read of the file).
    """
    path, root = os.fspath(path), os.fspath(root)
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ValueError(f"path {path!r} is not under root {root!r}")
    rel = rel.replace(os.sep, "/")
    if content:
        with open(path, "rb") as f:
            return f"{rel}|xxh3_128={xxhash.xxh3_128(f.read()).hexdigest()}"
    st = os.stat(path)
    return f"{rel}|size={st.st_size}|mtime_ns={st.st_mtime_ns}"


def bytes_key(data, prefix: str = "") -> str:
    """The key of a sample given by its bytes (an encoded image, an array's buffer)."""
    return f"{prefix}xxh3_128={xxhash.xxh3_128(memoryview(data).cast('B')).hexdigest()}"


def entry_name(key: str) -> str:
    """File name of a key's entry: a hash, since keys may hold '/', be long, or be any text."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"key must be a non-empty str, got {key!r}")
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()
