"""metrics.jsonl (one JSON object per optimizer step), val.jsonl (one per validation), TensorBoard if present."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pyfast._io import atomic_write_text, read_jsonl  # noqa: F401 (read_jsonl: re-exported)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN; keep it readable and parseable
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def truncate_after(path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


_told = set()  # what this process already said about TensorBoard


def _say_once(message: str, log) -> None:
    if message not in _told:
        _told.add(message)
        log(message)


class MetricsLog:
    """Appends records to a JSONL file (flushed per record) and mirrors scalars to TensorBoard.

    TensorBoard is optional: when it is not installed (or its writer fails to start) the log says
    so once per process, and the metrics go to the JSONL file only.
    """

    def __init__(self, path, tensorboard_dir=None, log=print):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _say_once("TensorBoard is not installed: metrics go to metrics.jsonl only (pip install tensorboard "
                          "for TensorBoard logs)", log)
            else:
                try:
                    self._tb = SummaryWriter(os.fspath(tensorboard_dir))
                except Exception as error:
                    _say_once(f"warning: TensorBoard writer failed to start ({type(error).__name__}: {error}); "
                              "metrics go to metrics.jsonl only", log)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: dict, prefix: str = "train") -> None:
        self._handle.write(json.dumps(_clean(record)) + "\n")
        self._handle.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)) and v is not None:
                            self._tb.add_scalar(f"{prefix}/{key}/{sub}", v, step)
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
