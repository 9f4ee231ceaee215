"""Soak: thousands of pyfast-train steps with the memory monitor on, its verdict, and what it costs.

    python benchmarks/bench_soak.py                      # 2000 steps, then the on/off comparison
    PYFAST_SOAK_STEPS=5000 python benchmarks/bench_soak.py
    pytest benchmarks/bench_soak.py -s                   # the same; asserts no leak and |slope| < bound

1. The soak: `pyfast.train.train(run)`, the loop pyfast-train runs, on a small model (the --fast
   shapes with 16 hidden channels on 32 px images of a 400-sample synthetic set, batches of 8,
   cache on, one torch thread) for PYFAST_SOAK_STEPS optimizer steps (an epoch is 44 steps plus a
   validation), with the monitor as
   every run has it (a sample every 10 steps, the default leak rule: 10 MB per 1000 steps). Reported:
   the host memory slope per 1000 steps with its 95% interval over the judged window, RSS at the
   start and the end, and the verdict from summary.json.
2. The overhead, on vs off in the same process: the training step (`pyfast.train.step.train_step`
   on the same run, features cached) in alternating blocks of BLOCK steps with the monitor's
   `after_step` called after each step, and without it. Times are CPU time of this thread
   (`time.thread_time`; torch runs on this one thread), which a loaded machine disturbs far less
   than wall time. The monitor's own cost per call is also timed inside the soak.

The soak target: no leak flagged and |host slope| under the rule's 10 MB per 1000 steps.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

STEPS = int(os.environ.get("PYFAST_SOAK_STEPS", "2000"))
BLOCK = int(os.environ.get("PYFAST_SOAK_BLOCK", "100"))
PAIRS = int(os.environ.get("PYFAST_SOAK_PAIRS", "4"))
BOUND_MB = 10.0  # the default leak rule's host bound, per 1000 steps
SETTINGS = {
    "image_size": 32, "synthetic_samples": 400, "batch_size": 8, "roi_size": 4, "hidden": 16, "workers": 0,
    "epochs": 100000, "memory_every": 10,
}  # fmt: skip


def _prepare(out: Path):
    from pyfast.train import build_config, prepare
    from pyfast.train.config import FAST

    config = build_config(FAST, {**SETTINGS, "out": str(out), "max_steps": STEPS})
    return prepare(config, log=lambda message: print(f"  log: {message}", file=sys.stderr))


class TimedMemory:
    """run.memory with each after_step call's CPU time recorded (sampling steps apart)."""

    def __init__(self, memory):
        self.inner, self.sampled, self.skipped = memory, [], []

    def after_step(self, step):
        started = time.thread_time()
        fields = self.inner.after_step(step)
        (self.sampled if fields is not None else self.skipped).append(time.thread_time() - started)
        return fields

    def __getattr__(self, name):
        return getattr(self.inner, name)


def soak(out: Path) -> dict:
    from pyfast.train import train

    run = _prepare(out)
    timed = TimedMemory(run.memory)
    run.memory = timed
    started_cpu, started = time.thread_time(), time.perf_counter()
    summary = train(run, progress_bar=False)
    cpu, wall = time.thread_time() - started_cpu, time.perf_counter() - started
    samples = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    memory = summary["memory"]
    verdict = json.loads((out / "memory.json").read_text())["verdict"]
    host = verdict["series"].get("host", {})
    return {
        "steps": summary["steps"],
        "wall_s": wall,
        "cpu_s": cpu,
        "status": memory["status"],
        "leak": memory["leak"],
        "message": memory["message"],
        "host_field": host.get("field"),
        "host_slope": host.get("slope"),
        "host_ci": host.get("ci"),
        "judged_steps": memory["judged_steps"],
        "rss_slope": verdict["series"].get("rss_mb", {}).get("slope"),
        "fds_slope": memory["fds_per_1000_steps"],
        "rss_first_last": [samples[0]["rss_mb"], samples[-1]["rss_mb"]],
        "samples": len(samples),
        "searches": verdict["investigations"],
        "monitor_cpu_ms_per_sample": 1e3 * statistics.median(timed.sampled),
        "monitor_cpu_ms_per_other_step": 1e3 * statistics.median(timed.skipped),
        "monitor_cpu_share": (sum(timed.sampled) + sum(timed.skipped)) / cpu,
        "val_iou_refined": summary["val_iou_refined"],
    }


def overhead(out: Path) -> dict:
    """Thread CPU per training step, monitor on vs off, in alternating blocks on one run."""
    from pyfast.train.state import StepTimes
    from pyfast.train.step import train_step

    run = _prepare(out)
    data = run.data
    step = 0

    def steps():
        epoch = 0
        while True:
            for batch in data.loader(data.epoch_batches(epoch)):
                yield epoch, batch
            epoch += 1

    stream = steps()
    for _ in range(2 * data.micro_per_epoch):  # two epochs: every feature cached, allocator warm
        epoch, batch = next(stream)
        train_step(run, [batch], epoch, StepTimes())
    per_step = {"on": [], "off": []}
    for _ in range(PAIRS):
        for mode in ("on", "off") if _ % 2 == 0 else ("off", "on"):
            started = time.thread_time()
            for _ in range(BLOCK):
                epoch, batch = next(stream)
                train_step(run, [batch], epoch, StepTimes())
                step += 1
                if mode == "on":
                    run.memory.after_step(step)
            per_step[mode].append((time.thread_time() - started) / BLOCK)
    run.memory.finish(wait=False)
    on, off = statistics.median(per_step["on"]), statistics.median(per_step["off"])
    return {"step_ms_on": on * 1e3, "step_ms_off": off * 1e3, "overhead": on / off - 1.0,
            "blocks": {mode: [round(v * 1e3, 3) for v in values] for mode, values in per_step.items()}}


def _num(value, spec: str = "+.2f") -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's CPU time is then the whole step's
    try:
        with tempfile.TemporaryDirectory(prefix="pyfast-soak-") as root:
            result = {"soak": soak(Path(root) / "soak"), "overhead": overhead(Path(root) / "overhead")}
    finally:
        torch.set_num_threads(threads)
    result["load_average"] = os.getloadavg()
    s, o = result["soak"], result["overhead"]
    print(f"soak: {s['steps']} steps in {s['wall_s']:.0f} s wall ({s['cpu_s']:.0f} s CPU of this thread), "
          f"{s['samples']} samples every {SETTINGS['memory_every']} steps")
    print(f"  verdict: {s['status']} (leak: {s['leak']}); {s['message']}")
    ci = s["host_ci"] or [None, None]
    print(f"  host ({s['host_field']}) slope {_num(s['host_slope'])} MB per 1000 steps, 95% CI "
          f"[{_num(ci[0])}, {_num(ci[1])}], judged over steps {s['judged_steps']}; "
          f"RSS slope {_num(s['rss_slope'])}; RSS {s['rss_first_last'][0]:.0f} -> {s['rss_first_last'][1]:.0f} MB; "
          f"descriptors {_num(s['fds_slope'])} per 1000 steps; searches for growers: {s['searches']}")
    print(f"  monitor inside the soak: {s['monitor_cpu_ms_per_sample']:.3f} ms CPU per sample, "
          f"{s['monitor_cpu_ms_per_other_step'] * 1e3:.2f} us on other steps, "
          f"{100 * s['monitor_cpu_share']:.2f}% of the soak's CPU")
    print(f"overhead (thread CPU per training step, medians of {PAIRS} blocks of {BLOCK} steps each): "
          f"on {o['step_ms_on']:.3f} ms, off {o['step_ms_off']:.3f} ms: {100 * o['overhead']:+.2f}%  {o['blocks']}")
    print(f"load average during the run: {' '.join(f'{v:.2f}' for v in result['load_average'])} "
          f"({os.cpu_count()} CPUs)")
    return result


def test_soak_no_leak_and_slope_under_bound():
    result = main()["soak"]
    assert result["steps"] >= 2000
    assert not result["leak"], result["message"]
    assert result["status"] == "ok" and abs(result["host_slope"]) < BOUND_MB, result["message"]


if __name__ == "__main__":
    main()
