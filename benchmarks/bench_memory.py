"""What memory monitoring costs: per step, per sample, per search for growers, and tracemalloc.

    pytest benchmarks/bench_memory.py --benchmark-only

- `step()` off the sampling steps (an integer test) and a full sample (RSS, anonymous RSS,
  workers, descriptors, CUDA counters when initialised, the slope refit, one JSONL line), with the
  USS read (a page-table walk, budgeted to 1% of wall time by default) timed apart;
- the amortised cost per step at every=10, against a small training step timed in the same run;
- an object census of this process (per object), the comparison at a window's end, and the
  pause a forked census costs the training process (the fork itself);
- tracemalloc's slowdown of an allocation-heavy step (1, 10 (the monitor's default) and 25 frames).

All times are CPU time of the calling thread (`time.thread_time`, also the timer of the
pytest-benchmark table), with torch on one thread: the numbers hold on a shared, loaded machine,
where wall time mostly measures the other processes. A table is printed at the end of the session.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np
import pytest
import torch

from pyfast.memory import LeakRule, MemoryMonitor
from pyfast.memory.fork import ForkedWork, fork_available
from pyfast.memory.growers import find_growers, take_census
from pyfast.memory.probes import MemoryProbe

_summary: dict = {}
clock = time.thread_time
pytestmark = pytest.mark.benchmark(timer=clock)


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request):
    def show():
        if _summary:
            print("\npyfast memory monitoring costs (CPU time of the calling thread, medians of this run)")
            for name, value in _summary.items():
                if not name.startswith("_"):
                    print(f"  {name:<72} {value}")

    request.config.add_cleanup(show)  # after the session's own output, outside its capture
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread's CPU time is then the whole step's
    yield
    torch.set_num_threads(threads)


def _median(benchmark) -> float:
    return benchmark.stats.stats.median


class _TrainStep:
    """A small CPU training step (conv head on 96 px features): the short end of real steps."""

    def __init__(self):
        torch.manual_seed(0)
        self.backbone = torch.nn.Conv2d(3, 16, 3, padding=1).requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=0.01)
        self.images = torch.rand(4, 3, 96, 96)

    def __call__(self):
        loss = self.head(self.backbone(self.images)).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


@pytest.fixture(scope="module")
def train_step():
    step = _TrainStep()
    for _ in range(3):
        step()
    return step


def test_train_step_reference(benchmark, train_step):
    benchmark.pedantic(train_step, rounds=30, iterations=1, warmup_rounds=3)
    _summary["reference training step (conv head, 4 x 96 px)"] = f"{_median(benchmark) * 1e3:.2f} ms"


def test_step_off_the_sampling_steps(benchmark):
    monitor = MemoryMonitor(every=1_000_000, investigate=False)
    counter = iter(range(1, 10**9))
    benchmark(lambda: monitor.step(next(counter)))
    _summary["step() off the sampling steps"] = f"{_median(benchmark) * 1e9:.0f} ns"


def test_sample(benchmark, tmp_path):
    monitor = MemoryMonitor(every=1, rule=LeakRule(window=60, min_samples=20, min_steps=50), out_dir=tmp_path,
                            investigate=False, full_info_budget=0.0)
    counter = iter(range(1, 10**9))
    for _ in range(120):  # a full window: the refit works on 60 samples
        monitor.step(next(counter))
    benchmark.pedantic(lambda: monitor.step(next(counter)), rounds=300, iterations=1)
    sample_s = _median(benchmark)
    _summary["sample (RSS, anon, workers, fds, refit, JSONL line), no USS"] = f"{sample_s * 1e3:.3f} ms"
    _summary["_sample_s"] = sample_s


def test_uss_read(benchmark):
    probe = MemoryProbe(full_info_budget=1.0, note=lambda message: None)
    benchmark.pedantic(probe.process.memory_full_info, rounds=30, iterations=1)
    rss = probe.process.memory_info().rss / 2**20
    _summary[f"USS read (page-table walk) at {rss:,.0f} MB RSS"] = f"{_median(benchmark) * 1e3:.2f} ms"


def test_amortised_per_step(benchmark, train_step):
    """Training steps with and without the monitor, interleaved so that both see the same load."""
    monitor = MemoryMonitor(every=10, investigate=False)
    times = {"with": [], "without": []}

    def both(step=iter(range(1, 10**9))):
        start = clock()
        train_step()
        monitor.step(next(step))
        middle = clock()
        train_step()
        times["with"].append(middle - start)
        times["without"].append(clock() - middle)

    benchmark.pedantic(both, rounds=200, iterations=1, warmup_rounds=10)
    with_monitor, without = (float(np.mean(times[k])) for k in ("with", "without"))
    reads = sum(s["uss_mb"] is not None for s in monitor.samples)
    _summary["training step with / without the monitor at every=10 (means, interleaved)"] = \
        f"{with_monitor * 1e3:.2f} / {without * 1e3:.2f} ms ({with_monitor / without - 1:+.1%})"
    _summary["  difference per step (USS read on {} of {} samples)".format(reads, len(monitor))] = \
        f"{(with_monitor - without) * 1e6:.0f} us"
    if "_sample_s" in _summary:
        _summary["amortised per step at every=10 from a sample without USS (sample / 10)"] = \
            f"{_summary['_sample_s'] / 10 * 1e6:.0f} us"


def test_census(benchmark):
    gc.collect()
    census = benchmark.pedantic(lambda: take_census(0), rounds=2, iterations=1)
    seconds = _median(benchmark)
    _summary[f"object census ({census.objects:,} objects)"] = \
        f"{seconds:.2f} s ({seconds / census.objects * 1e6:.2f} us per object)"


def test_comparison(benchmark):
    census = take_census(0)
    kept = [torch.rand(1000) for _ in range(200)]
    benchmark.pedantic(lambda: find_growers(census, 1, trigger="host"), rounds=2, iterations=1)
    _summary["census + comparison at a window's end"] = f"{_median(benchmark):.2f} s"
    del kept


@pytest.mark.skipif(not fork_available(), reason="needs fork")
def test_fork_pause(benchmark):
    """What a forked census costs the training process: the fork; the child works alongside."""
    children = []

    def fork():
        children.append(ForkedWork(lambda: None))

    benchmark.pedantic(fork, rounds=10, iterations=1)
    for child in children:
        child.wait()
    _summary["training pause for a forked census (fork)"] = f"{_median(benchmark) * 1e3:.1f} ms"


def _allocating_step():
    """Python-heavy work (a collate of per-sample dicts), where tracemalloc costs the most."""
    batch = [{"boxes": [float(i), 1.0, 2.0, 3.0], "key": f"sample-{i}", "masks": list(range(32))} for i in range(256)]
    return {k: [sample[k] for sample in batch] for k in batch[0]}


@pytest.mark.parametrize("frames", [0, 1, 10, 25])
def test_tracemalloc_overhead(benchmark, frames, train_step):
    runs = _summary.setdefault("_tracemalloc", {})
    if frames:
        tracemalloc.start(frames)
    try:
        benchmark.pedantic(_allocating_step, rounds=50, iterations=1, warmup_rounds=3)
        steps = []
        for _ in range(20):
            start = clock()
            train_step()
            steps.append(clock() - start)
        runs[frames] = (_median(benchmark), float(np.median(steps)))
    finally:
        if frames:
            tracemalloc.stop()
    if frames and 0 in runs:
        _summary[f"tracemalloc, {frames} frame(s): slowdown of an allocating step / a training step"] = \
            f"{runs[frames][0] / runs[0][0]:.1f}x / {runs[frames][1] / runs[0][1]:.2f}x"
