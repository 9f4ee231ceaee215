"""Atomic file writes: a temporary name in the target folder, fsync, os.replace; and reading the
append-only JSONL logs (metrics, validation, memory samples) back.

A reader (another DataLoader worker, another rank) sees either no file or a complete one, never
a partial write. A crash before the rename leaves only a `.*.tmp` file, which no reader looks at
and `remove_stale_temporaries` clears.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_name(path: str) -> str:
    folder, base = os.path.split(path)
    # Unique per writer: concurrent writers of one entry never share a temporary file.
    return os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _write_all(fd: int, parts) -> int:
    """One writev for all parts (no concatenation copy); loops only on a short write."""
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    total = sum(v.nbytes for v in views)
    written = 0
    while views:
        n = os.writev(fd, views)
        written += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable (the new name survives a power cut, not just a crash)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, parts, *, fsync: bool = True, sync_folder: bool = False) -> int:
    """Writes the concatenation of `parts` (bytes-like objects) to `path` atomically; returns its size.

    fsync: flush the data before the rename. sync_folder: also fsync the folder after it (what a
    checkpoint wants; a cache entry, which can always be recomputed, does not need it).
    """
    path = os.fspath(path)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            size = _write_all(fd, parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    return size


def atomic_write_text(path, text: str, *, sync_folder: bool = False) -> int:
    """atomic_write of a UTF-8 text file (configs, summaries, logs rewritten on resume)."""
    return atomic_write(path, [text.encode("utf-8")], sync_folder=sync_folder)


def read_all(path: str, out) -> int:
    """Reads the whole file at `path` into the writable buffer `out` (sized by the caller)."""
    with open(path, "rb", buffering=0) as f:
        view = memoryview(out).cast("B")
        got = 0
        while got < view.nbytes:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        return got


def remove_stale_temporaries(folder: str, older_than_s: float = 3600.0) -> int:
    """Deletes `.*.tmp` files under `folder` older than `older_than_s` (left by crashed writers)."""
    removed, now = 0, time.time()
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                full = os.path.join(dirpath, name)
                try:
                    if now - os.stat(full).st_mtime > older_than_s:
                        os.unlink(full)
                        removed += 1
                except FileNotFoundError:
                    pass
    return removed


def read_jsonl(path) -> list:
    """The records of a JSON-lines log, [] when it does not exist; a last line cut short by a crash
    ends the usable log."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records
