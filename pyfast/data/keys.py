"""Content-based cache keys.

A key names what the features are computed from: the file's bytes (so moving or copying the data
folder keeps every key, and editing a file changes it), never an absolute path or a device.
"""

from __future__ import annotations

import hashlib

KEY_DIGEST_BYTES = 16


def content_key(kind: str, content: bytes, *extra: object) -> str:
    """`kind-<hex>` over the content and the extra parts (e.g. a COCO image id)."""
    digest = hashlib.blake2b(digest_size=KEY_DIGEST_BYTES)
    digest.update(content)
    for part in extra:
        digest.update(b"\x00")
        digest.update(str(part).encode("utf-8"))
    return f"{kind}-{digest.hexdigest()}"
