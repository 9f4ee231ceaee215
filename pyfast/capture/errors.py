"""The exceptions of activation capture (ValueErrors: every command line reports them as one line)."""

from __future__ import annotations


class CaptureError(ValueError):
    """A capture that cannot start or go on: an unknown layer pattern, an output that cannot be
    stored, a policy violation, an output folder that belongs to another capture."""


class ShardCorruptError(CaptureError):
    """A shard whose bytes do not match what the manifest recorded (damaged, truncated, replaced).
    The message names the file."""
