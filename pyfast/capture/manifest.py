"""The capture folder's bookkeeping: manifest.json, shards.jsonl, and what must match to resume.

manifest.json is written (atomically) when a capture starts and again when it completes. Its four
identity sections say what the shards hold; a rerun must agree on all four, or it is refused with
the differences spelled out:

    model    the digest of the model's class, parameters and buffers (the weights hash)
    layers   the captured tensors: names, modules, per-sample shapes, pooling
    data     per source: kind, sample count and a digest of its sample list; the preprocessing
    storage  dtype, shard size, samples per shard, autocast precision, image size

Anything else (device, batch size, workers, the overflow/non-finite policies) may change between
runs: each shard records the statistics of what happened to it. Paths are informational only, so a
moved data or weights folder resumes.

shards.jsonl gets one JSON line per completed shard, appended after the shard file is in place: a
shard counts as done only when both exist. A line cut short by a crash (no trailing newline) is
dropped when the log is next read.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional

from pyfast import _io
from pyfast.capture.errors import CaptureError

FORMAT = "pyfast.capture"
VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_LOG_FILE = "shards.jsonl"
SKIPPED_FILE = "skipped.jsonl"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"
IDENTITY_SECTIONS = ("model", "layers", "data", "storage")
STATUS_RUNNING, STATUS_COMPLETE = "running", "complete"


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def identity(manifest: dict) -> Dict[str, object]:
    """The parts of each identity section that must match on resume (the rest is description)."""
    model, layers, data, storage = (manifest[s] for s in IDENTITY_SECTIONS)
    return {
        "model": {"digest": model["digest"]},
        "layers": {
            "tensors": [[t["name"], t["module"], t["shape"], t["pool"]] for t in layers["tensors"]],
        },
        "data": {
            "sources": [[s["kind"], s["samples"], s["items"]] for s in data["sources"]],
            "samples": data["samples"],
            "preprocess": data["preprocess"],
        },
        "storage": {k: storage[k] for k in ("dtype", "shard_mb", "samples_per_shard", "precision", "image_size")},
    }


def run_id(manifest: dict) -> str:
    """A short hash of the identity: every shard carries it, so a shard of another capture is caught."""
    return hashlib.sha256(_json(identity(manifest)).encode()).hexdigest()[:24]


# ------------------------------------------------------------------ what changed


def _short(digest: str) -> str:
    return digest[:12] if isinstance(digest, str) else str(digest)


def _some(names: List[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _layer_changes(old: dict, new: dict) -> str:
    before = {t["name"]: t for t in old["tensors"]}
    after = {t["name"]: t for t in new["tensors"]}
    parts = []
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    if added:
        parts.append(f"added {_some(added)}")
    if removed:
        parts.append(f"removed {_some(removed)}")
    grouped: Dict[str, List[str]] = {}
    for name in after:
        if name in before:
            a, b = before[name], after[name]
            if a["pool"] != b["pool"]:
                grouped.setdefault(f"pooling {a['pool']} -> {b['pool']}", []).append(name)
            elif a["shape"] != b["shape"] or a["module"] != b["module"]:
                grouped.setdefault(f"shape {tuple(a['shape'])} -> {tuple(b['shape'])}", []).append(name)
    parts += [f"{change} for {_some(names)}" for change, names in grouped.items()]
    if not parts:
        parts.append("the order of the tensors")
    return "; ".join(parts)


def _data_changes(old: dict, new: dict) -> str:
    parts = []
    if old["samples"] != new["samples"]:
        parts.append(f"{old['samples']:,} -> {new['samples']:,} samples")
    a, b = old["sources"], new["sources"]
    if [s["kind"] for s in a] != [s["kind"] for s in b]:
        parts.append(f"sources {[s['label'] for s in a]} -> {[s['label'] for s in b]}")
    else:
        for s, t in zip(a, b):
            if s["samples"] != t["samples"] and len(a) > 1:
                parts.append(f"{t['label']}: {s['samples']:,} -> {t['samples']:,} samples")
            elif s["samples"] == t["samples"] and s["items"] != t["items"]:
                parts.append(f"{t['label']}: other samples (its list of files or keys differs)")
    if old["preprocess"] != new["preprocess"]:
        parts.append(f"preprocessing {_json(old['preprocess'])} -> {_json(new['preprocess'])}")
    return "; ".join(parts) or "the data set"


def describe_changes(old: dict, new: dict) -> List[str]:
    """One line per identity section that differs, naming what changed."""
    a, b = identity(old), identity(new)
    lines = []
    if a["model"] != b["model"]:
        was = old["model"].get("spec") or old["model"].get("class")
        now = new["model"].get("spec") or new["model"].get("class")
        what = f" ({was} -> {now})" if was != now else ""
        lines.append(
            f"model: weights digest {_short(old['model']['digest'])} -> {_short(new['model']['digest'])}{what}"
        )
    if a["layers"] != b["layers"]:
        lines.append(f"layers: {_layer_changes(old['layers'], new['layers'])}")
    if a["data"] != b["data"]:
        lines.append(f"data: {_data_changes(old['data'], new['data'])}")
    if a["storage"] != b["storage"]:
        changed = [f"{k} {a['storage'][k]} -> {b['storage'][k]}" for k in a["storage"] if a["storage"][k] != b["storage"][k]]
        lines.append("storage: " + ", ".join(changed))
    return lines


# ------------------------------------------------------------------ files


def manifest_path(root) -> str:
    return os.path.join(os.fspath(root), MANIFEST_FILE)


def read_manifest(root) -> Optional[dict]:
    """The manifest of the capture folder `root`, or None when it has none."""
    path = manifest_path(root)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise CaptureError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CaptureError(f"{path}: not a pyfast-capture manifest")
    if manifest.get("version") != VERSION:
        raise CaptureError(f"{path}: capture format version {manifest.get('version')!r}, this pyfast reads {VERSION}")
    return manifest


def write_manifest(root, manifest: dict) -> None:
    _io.atomic_write_text(manifest_path(root), json.dumps(manifest, indent=1) + "\n", sync_folder=True)


def complete_lines(path) -> List[str]:
    """The newline-terminated lines of a JSONL file ([] when absent); a last line without its
    newline, cut short by a crash, is left out."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    return [line for line in data[:end].decode("utf-8").split("\n") if line.strip()]


def drop_partial_line(path) -> bool:
    """Truncates a JSONL file after its last complete line; returns whether anything was cut."""
    try:
        with open(path, "rb+") as handle:
            data = handle.read()
            end = data.rfind(b"\n") + 1
            if end == len(data):
                return False
            handle.truncate(end)
            return True
    except FileNotFoundError:
        return False


def read_shard_log(root) -> List[dict]:
    """The completed shards' entries, in order; CaptureError for a log that is not ours or out of order."""
    path = os.path.join(os.fspath(root), SHARD_LOG_FILE)
    entries = []
    for number, line in enumerate(complete_lines(path), 1):
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise CaptureError(f"{path}:{number}: not a shard record ({error})") from None
        if not isinstance(entry, dict) or entry.get("shard") != len(entries):
            raise CaptureError(f"{path}:{number}: expected the record of shard {len(entries)}")
        entries.append(entry)
    return entries


def append_shard_record(root, entry: dict, *, fsync: bool = True) -> None:
    """Appends one line (one write) and flushes it to disk."""
    path = os.path.join(os.fspath(root), SHARD_LOG_FILE)
    line = (_json(entry) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_shard_log(root, entries: List[dict]) -> None:
    text = "".join(_json(e) + "\n" for e in entries)
    _io.atomic_write_text(os.path.join(os.fspath(root), SHARD_LOG_FILE), text)


def keep_valid_prefix(root, entries: List[dict], check: Callable[[dict], Optional[str]], log) -> List[dict]:
    """The entries up to the first whose shard fails `check` (which returns a problem or None);
    the log is cut there, so that shard and the ones after it are captured again."""
    for position, entry in enumerate(entries):
        problem = check(entry)
        if problem is not None:
            log(f"warning: {problem}: capturing shard {entry['shard']} and the {len(entries) - position - 1} after it again")
            rewrite_shard_log(root, entries[:position])
            return entries[:position]
    return entries


class FolderLock:
    """An exclusive lock on a capture folder (released by the OS if the process dies)."""

    def __init__(self, root):
        self.path = os.path.join(os.fspath(root), LOCK_FILE)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: one writer per folder is then up to the user
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise CaptureError(f"{os.path.dirname(self.path)}: another capture is writing to this folder") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
