"""The files the monitor writes into a run directory, and reading them back.

- `memory.jsonl`: one sample per line, appended and flushed as it is taken (it survives a crash,
  an out-of-memory kill included). Fields: see `pyfast.memory.monitor.FIELDS`.
- `memory.json`: what the samples alone do not hold, written atomically at the first sample,
  after each search for growers and at the end: `{"version", "every", "rule", "notes",
  "investigations", "verdict"}`. `verdict` is the last one computed; readers recompute it from
  the samples, the rule and the investigations (`load_run`), which gives the same result for a
  finished run and an up-to-date one for a run that died.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional, Tuple

from pyfast._io import atomic_write_text, read_jsonl

SAMPLES_FILE = "memory.jsonl"
REPORT_FILE = "memory.json"
FORMAT_VERSION = 1


def clean(value):
    """JSON has no NaN or infinity: they become null (a missing measurement)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def sample_line(sample: dict) -> str:
    return json.dumps(clean(sample), separators=(",", ":")) + "\n"


def read_samples(path) -> List[dict]:
    """The samples of a memory.jsonl; a last line cut short by a crash ends the usable log."""
    return read_jsonl(path)


def write_samples(path, samples) -> None:
    atomic_write_text(path, "".join(sample_line(s) for s in samples))


def write_report(path, report: dict) -> None:
    atomic_write_text(path, json.dumps(clean(report), indent=1) + "\n")


def read_report(path) -> Optional[dict]:
    path = Path(path)
    if not path.exists():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or report.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a pyfast memory report of format version {FORMAT_VERSION}")
    return report


def load_run(run_dir) -> Tuple[List[dict], Optional[dict]]:
    """(samples, report) of a run directory; either may be empty/None."""
    run_dir = Path(run_dir)
    return read_samples(run_dir / SAMPLES_FILE), read_report(run_dir / REPORT_FILE)
