"""Content-based cache keys for data samples.

A key names what the features are computed from: the file's bytes, which the source reads anyway
to load the sample (so moving or copying the data folder keeps every key, and editing a file changes
it), never an absolute path or a device. The hashing itself is the cache's `bytes_key`.
"""

from __future__ import annotations

from pyfast.cache.keys import bytes_key


def content_key(kind: str, content: bytes, *extra: object) -> str:
    """`kind[:extra...]:` + the hash of the content (extra: e.g. a COCO image id)."""
    prefix = ":".join([kind, *map(str, extra)]) + ":"
    return bytes_key(content, prefix=prefix)
