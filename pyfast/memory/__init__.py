"""Memory you can trust over long runs: sampling, leak verdicts, what grows.

- `MemoryMonitor`: samples host, worker and CUDA memory and open descriptors every N steps, judges
  growth with a Theil–Sen slope (`LeakRule`) and names what grows.
- `MemoryMonitorCallback` (needs Lightning: `pip install "pyfast[lightning]"`): the same monitor
  for Lightning trainers.
- `diagnose(run_dir)`: the verdict of a run directory's memory.jsonl / memory.json
  (`pyfast-doctor memory RUN_DIR`).
"""

from pyfast.memory.doctor import diagnose
from pyfast.memory.files import REPORT_FILE, SAMPLES_FILE, load_run
from pyfast.memory.monitor import FIELDS, MemoryMonitor
from pyfast.memory.plot import write_memory_plot
from pyfast.memory.report import format_verdict, summarize
from pyfast.memory.trend import theil_sen
from pyfast.memory.verdict import LeakRule, build_verdict

__all__ = [
    "FIELDS",
    "LeakRule",
    "MemoryMonitor",
    "MemoryMonitorCallback",
    "REPORT_FILE",
    "SAMPLES_FILE",
    "build_verdict",
    "diagnose",
    "format_verdict",
    "load_run",
    "summarize",
    "theil_sen",
    "write_memory_plot",
]


def __getattr__(name):
    # Lightning is optional: importing pyfast.memory must not need it.
    if name == "MemoryMonitorCallback":
        from pyfast.memory.lightning import MemoryMonitorCallback

        return MemoryMonitorCallback
    raise AttributeError(f"module 'pyfast.memory' has no attribute {name!r}")
