"""MemoryMonitor: memory sampled every N steps, growth judged by a robust slope, growers named.

    monitor = MemoryMonitor(every=10, out_dir=run_dir)
    for step in range(1, total + 1):
        train_step()
        sample = monitor.step(step)          # a dict every 10th step (merge into your metrics), else None
        if (reason := monitor.check(100.0)):  # sustained growth over 100 MB per 1000 steps
            stop(reason)
    verdict = monitor.close()                 # writes memory.json; verdict["leak"], ["series"], ["growers"]

`step()` off the sampling steps is an integer test. A sample reads /proc and the CUDA allocator's
counters (no device synchronization), appends one line to `memory.jsonl` and refits the slopes of
the last window (under a millisecond; see benchmarks/bench_memory.py). When host or CUDA memory
starts growing, the monitor looks for what grows (`pyfast.memory.search`): object censuses at the
start and end of a window of `investigate_steps` steps, in a forked child where possible, with
tracemalloc tracing in between; at most `max_investigations` times per run.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from pyfast.memory.files import (
    FORMAT_VERSION,
    REPORT_FILE,
    SAMPLES_FILE,
    clean,
    sample_line,
    write_report,
    write_samples,
)
from pyfast.memory.probes import MemoryProbe
from pyfast.memory.report import describe_growth, summarize
from pyfast.memory.search import WINDOW, GrowthSearch
from pyfast.memory.verdict import (
    GROWING,
    LEAK,
    OK,
    SERIES_FIELDS,
    WATCHED,
    LeakRule,
    assess_columns,
    build_verdict,
    passes,
)

# Every sample has these fields (None where not measured); MB are 2**20 bytes.
FIELDS = (
    "step",               # the caller's step number
    "time",               # wall clock, seconds since the epoch
    "segment",            # 0, then +1 per resume: samples of different processes are not compared
    "rss_mb",             # resident set size of this process
    "anon_mb",            # its anonymous resident memory (rss - file-backed shared pages; Linux)
    "uss_mb",             # its unique set size (read under a time budget: None on some samples)
    "workers",            # number of child processes (DataLoader workers)
    "workers_key",        # changes when the set of workers changes
    "workers_rss_mb",     # their summed RSS
    "workers_uss_mb",     # their summed USS (under the same budget)
    "fds",                # open file descriptors (handles on Windows)
    "cuda_allocated_mb",  # CUDA memory held by live tensors (torch.cuda.memory_stats)
    "cuda_reserved_mb",   # held by the caching allocator
    "cuda_peak_mb",       # peak allocated since the process started (or the last reset)
    "sample_ms",          # what taking this sample cost, judging included
)
_INT_FIELDS = {"step", "segment", "workers", "workers_key", "fds"}
_LOGGER = logging.getLogger("pyfast.memory")


class MemoryMonitor:
    """Samples memory every `every` steps and judges whether it grows (see `pyfast.memory.verdict`).

    every: sampling period in steps (>= 1).
    rule: the leak rule's bounds and evidence (`LeakRule()`: 10 MB per 1000 steps for host, worker
        and CUDA memory, 5 descriptors per 1000 steps; 200 warm-up steps; a 60-sample window).
    out_dir: where memory.jsonl and memory.json go (None: keep everything in memory).
    investigate: look for what grows when growth is suspected (object censuses, tracemalloc).
    investigate_steps: the length of that look (default 5 samples).
    max_investigations: at most this many per run (each costs about a second per 500k objects).
    tracemalloc_frames: frames kept per traced allocation (0: no tracemalloc, censuses only).
    full_info_budget: the fraction of wall time USS reads may take (they walk the page tables).
    device: the CUDA device whose allocator is read (default: the current one).
    fork: run the object censuses in a forked child (default: where fork is safe, Linux), which
        leaves this process's heap undisturbed and lets training go on meanwhile.
    log: receives the monitor's messages (default: the "pyfast.memory" logger, at warning level).
    """

    def __init__(
        self,
        every: int = 10,
        *,
        rule: Optional[LeakRule] = None,
        out_dir=None,
        investigate: bool = True,
        investigate_steps: Optional[int] = None,
        max_investigations: int = 3,
        tracemalloc_frames: int = 10,
        full_info_budget: float = 0.01,
        device=None,
        fork: Optional[bool] = None,
        log: Optional[Callable[[str], None]] = None,
    ):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if rule is not None and not isinstance(rule, LeakRule):
            raise TypeError(f"rule must be a pyfast.memory.LeakRule, got {type(rule).__name__}")
        if investigate_steps is not None and not (isinstance(investigate_steps, int) and investigate_steps >= every):
            raise ValueError(f"investigate_steps must be an int >= every ({every}), got {investigate_steps!r}")
        if not (isinstance(max_investigations, int) and max_investigations >= 0):
            raise ValueError(f"max_investigations must be an int >= 0, got {max_investigations!r}")
        if not (isinstance(tracemalloc_frames, int) and tracemalloc_frames >= 0):
            raise ValueError(f"tracemalloc_frames must be an int >= 0, got {tracemalloc_frames!r}")
        rule = rule or LeakRule()
        if (rule.window - 1) * every < rule.min_steps:
            raise ValueError(f"a window of {rule.window} samples every {every} steps spans fewer than the rule's "
                             f"min_steps ({rule.min_steps}): no growth could ever be judged sustained; sample less "
                             f"often (every >= {-(-rule.min_steps // (rule.window - 1))}) or pass a LeakRule with a "
                             f"longer window or smaller min_steps")
        self.every = every
        self.rule = rule
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.investigate = investigate
        self.investigate_steps = investigate_steps or 5 * every
        self.max_investigations = max_investigations
        self.tracemalloc_frames = tracemalloc_frames
        self.fork = fork
        self._log = log or _LOGGER.warning
        self.notes: List[str] = []
        self._probe = MemoryProbe(full_info_budget=full_info_budget, device=device, note=self._note)

        self._columns: Dict[str, array] = {name: array("d") for name in FIELDS}
        self._segment = 0
        self._segment_start: Optional[int] = None  # step of the segment's first sample
        self._last_step: Optional[int] = None
        self._counter = 0
        self._assessments: Dict[str, dict] = {}
        self._investigations: List[dict] = []
        self._search: Optional[GrowthSearch] = None
        self._judge_after: Optional[int] = None  # end step of the latest search in this segment
        self._armed = {"host": True, "cuda": True}
        self._handle = None
        self._append = False  # the first write of a fresh monitor starts memory.jsonl anew
        self._report_written = False

    # ------------------------------------------------------------------ sampling

    def step(self, step: Optional[int] = None) -> Optional[dict]:
        """Call once per training step; samples when `step` is a multiple of `every`.

        step: the step number (default: one more than the last call's). Returns the sample (a
        JSON-ready dict with the FIELDS) when one was taken, else None.
        """
        if step is None:
            step = self._counter + 1
        self._counter = step
        if step % self.every:
            return None
        return self.sample(step)

    def sample(self, step: Optional[int] = None) -> Optional[dict]:
        """Takes a sample now (at `step`, default the last step seen); None if that step has one."""
        started = time.perf_counter()
        step = int(self._counter if step is None else step)
        if self._last_step is not None and step <= self._last_step:
            return None  # already sampled (a repeated step number, e.g. during accumulation)
        self._probe.ignore_pids = self._search.pids if self._search is not None else set()
        record = {"step": step, "time": time.time(), "segment": self._segment, **self._probe.read()}
        self._last_step = step
        if self._segment_start is None:
            self._segment_start = step
        record["sample_ms"] = None
        self._append_record(record)
        self._assessments = self._assess_live()
        record["sample_ms"] = (time.perf_counter() - started) * 1e3
        self._columns["sample_ms"][-1] = record["sample_ms"]
        self._write_line(record)
        if not self._report_written:
            self.write_report()
        self._investigation_step(step)
        return record

    def _append_record(self, record: dict) -> None:
        for name in FIELDS:
            value = record.get(name)
            self._columns[name].append(math.nan if value is None else float(value))

    def _record(self, index: int) -> dict:
        out = {}
        for name in FIELDS:
            value = self._columns[name][index]
            if math.isnan(value):
                out[name] = None
            else:
                out[name] = int(value) if name in _INT_FIELDS else value
        return out

    def _assess_live(self) -> Dict[str, dict]:
        """The watched series' fits over the current segment's latest samples (a copy of the last 2 windows)."""
        tail = self.rule.window * 2  # the window counts samples after warm-up; workers may restart within
        columns = {name: np.frombuffer(self._columns[name], dtype=np.float64)[-tail:].copy() for name in SERIES_FIELDS}
        segment = np.frombuffer(self._columns["segment"], dtype=np.float64)[-tail:].copy()
        keep = segment == self._segment
        if self._judge_after is not None:  # the stretch after the latest search (see judged_pieces)
            keep &= columns["step"] > self._judge_after
        if self._search is not None and self._search.stage == WINDOW:  # judge what came before the search
            keep &= columns["step"] <= self._search.start
        if not keep.all():
            columns = {name: values[keep] for name, values in columns.items()}
        return assess_columns(columns, self.rule, self._segment_start, informative=False)

    def __len__(self) -> int:
        return len(self._columns["step"])

    @property
    def samples(self) -> List[dict]:
        """Every sample so far (all segments), as dicts."""
        return [self._record(i) for i in range(len(self))]

    def series(self) -> Dict[str, list]:
        """The samples by field: {field: [value or None per sample]}, ready for JSON."""
        return {name: [None if math.isnan(v) else (int(v) if name in _INT_FIELDS else v) for v in self._columns[name]]
                for name in FIELDS}

    # ------------------------------------------------------------------ judging

    @property
    def assessments(self) -> Dict[str, dict]:
        """The latest fit of each series (refreshed at every sample)."""
        return self._assessments

    def verdict(self) -> dict:
        """The leak verdict of the run so far (see `pyfast.memory.verdict.build_verdict`), JSON-ready."""
        return clean(build_verdict(self.samples, self.rule, self._investigations, self.notes))

    def summary(self) -> dict:
        """A compact form of the verdict for a run summary (slopes, status, the top grower)."""
        return summarize(self.verdict())

    def check(self, max_growth: float) -> Optional[str]:
        """A reason to stop when host, worker or CUDA memory grows faster than `max_growth` MB
        per 1000 steps by the leak rule (confident, sustained); else None. Costs no refit."""
        if not (isinstance(max_growth, (int, float)) and math.isfinite(max_growth) and max_growth > 0):
            raise ValueError(f"max_growth must be a positive number (MB per 1000 steps), got {max_growth!r}")
        for name in ("host", "workers", "cuda"):
            assessment = self._assessments.get(name)
            if assessment is not None and passes(assessment, max_growth, self.rule):
                return f"{describe_growth(name, assessment)}: over the bound of {max_growth:g} MB per 1000 steps"
        return None

    # ------------------------------------------------------------------ what grows

    def _own_ids(self) -> List[int]:
        """The monitor's own bookkeeping: never counted, never reported as a holder."""
        own = [id(self), id(vars(self)), id(self._probe), id(vars(self._probe))]
        stack = [self._columns, self._investigations, self._assessments, self.notes, self._armed]
        if self._search is not None:
            own.extend((id(self._search), id(vars(self._search))))
        while stack:  # the nested dicts and lists of the monitor's state
            item = stack.pop()
            own.append(id(item))
            if isinstance(item, dict):
                stack.extend(v for v in item.values() if isinstance(v, (dict, list, array)))
            elif isinstance(item, list):
                stack.extend(v for v in item if isinstance(v, (dict, list)))
        return own

    def _investigation_step(self, step: int) -> None:
        search = self._search
        if search is not None:
            if search.due(step):
                search.end_window(step, self._own_ids())
                self._judge_after = step
            outcome = search.poll()
            if outcome is not None:
                self._search = None
                self._record_search(search, outcome)
            return
        for trigger in ("host", "cuda"):
            status = self._assessments.get(trigger, {}).get("status")
            if status == OK:
                self._armed[trigger] = True
            elif status in (GROWING, LEAK) and self._armed[trigger] and self.investigate \
                    and len(self._investigations) < self.max_investigations:
                self._armed[trigger] = False
                self._search = GrowthSearch(trigger, step, own_ids=self._own_ids(), window_steps=self.investigate_steps,
                                            tracemalloc_frames=self.tracemalloc_frames, fork=self.fork)
                where = "in a forked process" if self._search.forked else "in this process"
                self._log(f"memory: {describe_growth(trigger, self._assessments[trigger])}; looking for what grows "
                          f"over the next {self.investigate_steps} steps (object censuses {where}"
                          f"{', tracemalloc on' if self.tracemalloc_frames else ''})")
                return

    def _record_search(self, search: GrowthSearch, outcome) -> None:
        status, report = outcome
        if status != "result":
            self._note(f"the search for what grows over steps {search.start}-{search.end} failed: {report}")
            return
        report["tracemalloc_frames"] = self.tracemalloc_frames
        report["segment"] = self._segment
        report["forked"] = search.forked
        self._investigations.append(clean(report))
        top = report["held_by"][0]["holder"] if report["held_by"] else "nothing Python holds"
        self._log(f"memory: growth search done ({report['census_seconds']:.2f} s of censuses): "
                  f"{report['new_objects']:,} new objects over steps {report['steps'][0]}-{report['steps'][1]}, "
                  f"held mostly by {top}")
        self.write_report()

    # ------------------------------------------------------------------ files and state

    def _note(self, message: str) -> None:
        self.notes.append(message)
        self._log(f"memory: {message}")

    def _write_line(self, record: dict) -> None:
        if self.out_dir is None:
            return
        if self._handle is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.out_dir / SAMPLES_FILE, "a" if self._append else "w", encoding="utf-8")
            self._append = True
        self._handle.write(sample_line(record))
        self._handle.flush()

    def report(self) -> dict:
        """What memory.json holds: the rule, notes, searches for growers and the verdict."""
        return {
            "version": FORMAT_VERSION,
            "every": self.every,
            "rule": self.rule.as_dict(),
            "notes": list(self.notes),
            "investigations": list(self._investigations),
            "verdict": self.verdict(),
        }

    def write_report(self) -> Optional[Path]:
        """Writes memory.json (atomically) into out_dir; returns its path (None without out_dir)."""
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / REPORT_FILE
        write_report(path, self.report())
        self._report_written = True
        return path

    def close(self, wait: bool = True) -> dict:
        """Ends the run: finishes a search for growers under way (a few seconds at most; with
        wait=False, on an interruption say, cancels it), writes memory.json, closes memory.jsonl;
        returns the verdict."""
        if self._search is not None:
            search, self._search = self._search, None
            if search.stage == WINDOW:
                self._judge_after = self._last_step
            if wait:
                self._record_search(search, search.wait(self._last_step, self._own_ids))
            else:
                search.cancel()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        verdict = self.verdict()
        self.write_report()
        return verdict

    def state_dict(self) -> dict:
        """Plain Python (torch.save- and JSON-able): the samples, searches and notes of the run."""
        return {
            "version": FORMAT_VERSION,
            "every": self.every,
            "segment": self._segment,
            "counter": self._counter,
            "series": self.series(),
            "investigations": list(self._investigations),
            "notes": list(self.notes),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues a run: its samples are kept (and memory.jsonl is rewritten to them, dropping
        samples taken after the checkpoint); new samples form a new segment, judged on their own,
        since a new process's memory is not comparable with the old one's."""
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a MemoryMonitor state of version {FORMAT_VERSION}")
        series = state["series"]
        length = len(series["step"])
        for name in FIELDS:
            values = series.get(name) or [None] * length
            self._columns[name] = array("d", (math.nan if v is None else float(v) for v in values))
        self._investigations = list(state.get("investigations", []))
        restored_notes = [n for n in state.get("notes", []) if n not in self.notes]
        self.notes[:0] = restored_notes
        self._segment = int(state.get("segment", 0)) + 1
        self._segment_start = None
        self._counter = int(state.get("counter", 0))
        self._last_step = None
        self._assessments = {}
        if self._search is not None:
            self._search.cancel()
            self._search = None
        self._judge_after = None
        self._armed = {"host": True, "cuda": True}
        if self.out_dir is not None:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_samples(self.out_dir / SAMPLES_FILE, self.samples)
            self._append = True
            self.write_report()


__all__ = ["FIELDS", "MemoryMonitor", "WATCHED"]
