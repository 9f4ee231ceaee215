"""Memory in a training run: a `pyfast.memory.MemoryMonitor` sampled after every optimizer step.

    memory = RunMemory(cfg.memory_every, parse_rule(cfg.memory_rule), cfg.max_memory_growth, log)
    memory.attach(run_dir)                   # once the run directory may be written (memory.jsonl, memory.json)
    fields = memory.after_step(step)         # the sample's fields on sampling steps (into the step's record), else None
    if memory.stop_reason: ...               # --max-memory-growth was passed: stop after this step
    memory.finish(wait=True)                 # the verdict, memory.json written
    summary["memory"] = memory.summary()     # slopes, verdict, top grower; `memory_line` for the table

A sample reads /proc and the CUDA allocator's counters, never a device tensor: no host sync. The
monitor's state (its samples, searches for growers, notes) is a checkpoint entry, so a resumed run
keeps its series; the resumed process's samples form a new segment, judged on their own.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from pyfast.memory import LeakRule, MemoryMonitor
from pyfast.memory.report import summarize
from pyfast.memory.verdict import INSUFFICIENT, WATCHED, overall_status

STOPPED_BY = "max_memory_growth"  # summary["stopped_by"] of a run that --max-memory-growth stopped
# The fields of a sample that go into the step's record in metrics.jsonl (step and wall clock are there already).
METRIC_FIELDS = ("rss_mb", "anon_mb", "uss_mb", "workers", "workers_rss_mb", "workers_uss_mb", "fds",
                 "cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb", "sample_ms")
_RULE_FIELDS = {f.name: type(f.default) for f in dataclasses.fields(LeakRule)}


def parse_rule(text: Optional[str]) -> LeakRule:
    """The leak rule of `--memory-rule KEY=VALUE[,KEY=VALUE...]` (keys: LeakRule's fields); None
    or empty: the default rule. Raises ValueError naming the flag and the key."""
    if not text:
        return LeakRule()
    values = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--memory-rule: expected KEY=VALUE items separated by commas, got {item.strip()!r}")
        if key not in _RULE_FIELDS:
            raise ValueError(f"--memory-rule: unknown key {key!r} (keys: {', '.join(_RULE_FIELDS)})")
        kind = _RULE_FIELDS[key]
        try:
            values[key] = kind(value)
        except ValueError:
            raise ValueError(f"--memory-rule: {key} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None
    try:
        return LeakRule(**values)
    except ValueError as error:
        raise ValueError(f"--memory-rule: {error}") from None


def check_settings(every: int, rule: LeakRule) -> None:
    """Refuses a sampling interval whose window of samples can never span the rule's min_steps."""
    if (rule.window - 1) * every < rule.min_steps:
        least = -(-rule.min_steps // (rule.window - 1))
        raise ValueError(f"--memory-every {every}: the leak rule's window of {rule.window} samples would span "
                         f"{(rule.window - 1) * every} steps, fewer than its min_steps ({rule.min_steps}), so no growth "
                         f"could ever be judged: use --memory-every {least} or more (or a --memory-rule with a longer "
                         f"window or a smaller min_steps)")


def steps_to_judge(samples: list, every: int, rule: LeakRule) -> int:
    """The step by which the latest segment has the samples the rule needs (a search for growers
    on the way restarts the judged stretch, which takes longer)."""
    if samples:
        segment = samples[-1]["segment"]
        first = next(s["step"] for s in samples if s["segment"] == segment)
    else:
        first = every
    after_warmup = -(-(first + rule.warmup_steps) // every) * every  # samples fall on multiples of `every`
    span = max(rule.min_steps, (rule.min_samples - 1) * every)
    return after_warmup + -(-span // every) * every


class RunMemory:
    """The monitor of one training process, the --max-memory-growth bound and the stop it calls for.

    every: sample every N optimizer steps. rule: the leak rule. max_growth: MB per 1000 steps (None:
    never stop). log: the run's log (the monitor's messages: growth suspected, what grows).
    """

    def __init__(self, every: int, rule: LeakRule, max_growth: Optional[float], log: Callable[[str], None]):
        check_settings(every, rule)
        self.monitor = MemoryMonitor(every, rule=rule, log=log)
        self.log = log
        self.max_growth = max_growth
        self.stop_reason: Optional[str] = None  # why --max-memory-growth stopped the run
        self.verdict: Optional[dict] = None  # set by finish()

    def attach(self, run_dir) -> None:
        """memory.jsonl (rewritten to the restored samples on a resume) and memory.json go into run_dir."""
        self.monitor.attach(run_dir)

    def after_step(self, step: int) -> Optional[dict]:
        """Called after optimizer step `step`: on sampling steps the sample's METRIC_FIELDS (and, with
        a bound, the check that may set `stop_reason`), else None (an integer test)."""
        sample = self.monitor.step(step)
        if sample is None:
            return None
        if self.max_growth is not None and self.stop_reason is None:
            self.stop_reason = self.monitor.check(self.max_growth)
        return {name: sample[name] for name in METRIC_FIELDS}

    def latest(self) -> Optional[dict]:
        """The latest sample's METRIC_FIELDS and the live status of the leak rule (for val.jsonl), or
        None. Read from the monitor's own columns: nothing here holds per-sample objects, which a
        search for growers would report as growing."""
        sample = self.monitor.latest()
        if sample is None:
            return None
        return {**{name: sample[name] for name in METRIC_FIELDS}, "status": overall_status(self.monitor.assessments)}

    def finish(self, wait: bool) -> dict:
        """Ends the monitoring (wait=False cancels a search for growers under way: an interrupted run
        must not wait); returns the verdict. The monitor is an observer: should closing it fail, the
        run's own ending (checkpoint, summary) still happens, and the failure is logged."""
        try:
            self.verdict = self.monitor.close(wait=wait)
        except Exception as error:  # noqa: BLE001 - reported, and the verdict of the samples is still given
            self.log(f"memory: closing the monitor failed ({type(error).__name__}: {error}); the verdict is "
                     "computed from the samples taken")
            self.verdict = self.monitor.verdict()
        return self.verdict

    def summary(self) -> dict:
        """summary.json's "memory": the slopes (per 1000 steps), status, leak, top grower, message,
        and the sampling interval, sample count, judged steps, bound and why it stopped the run."""
        verdict = self.verdict if self.verdict is not None else self.monitor.verdict()
        out = summarize(verdict)
        out.update(
            every=self.monitor.every,
            samples=verdict["samples"],
            judged_steps=verdict["judged_steps"],
            max_growth=self.max_growth,
            stopped=self.stop_reason,
            steps_to_judge=(steps_to_judge(self.monitor.samples, self.monitor.every, self.monitor.rule)
                            if verdict["status"] == INSUFFICIENT else None),
        )
        return out

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state)


def _slopes(memory: dict, names) -> str:
    parts = []
    for name in names:
        key = f"{name}_per_1000_steps" if name == "fds" else f"{name}_mb_per_1000_steps"
        slope = memory.get(key)
        if slope is not None:
            parts.append(f"{name} {slope:+.1f}" + ("" if name == "fds" else " MB"))
    return ", ".join(parts)


def memory_line(memory: Optional[dict]) -> str:
    """The final table's memory row: the verdict and the slopes per 1000 steps."""
    if not memory:
        return "n/a"
    status = memory["status"]
    if status == INSUFFICIENT:
        return (f"not enough steps to judge ({memory['samples']} samples every {memory['every']} steps; "
                f"the leak rule needs about {memory['steps_to_judge']} steps)")
    steps = memory.get("judged_steps")
    where = f" (steps {steps[0]}-{steps[1]})" if steps else ""
    if memory["leak"]:
        line = f"LEAK: {_slopes(memory, memory['leaking'])}{where}"
        return line + (f"; {memory['top_grower']}" if memory.get("top_grower") else "")
    label = "ok" if status == "ok" else "growing, not sustained"
    return f"{label}: {_slopes(memory, WATCHED)}{where}"
