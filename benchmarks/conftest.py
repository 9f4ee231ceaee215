"""Shared machinery for `pytest benchmarks --benchmark-only`.

Every benchmark times one implementation ("fused", "eager" = the reference twin, "compile" =
torch.compile of the reference) of one case and phase ("forward", "backward", "full") with
`measure(...)`. At the end of the session a table compares the implementations of each case
measured in the same run: ratios, GB/s (from the bytes a phase must move at least) and, where
given, extra memory. The table is also written as JSON to $PYFAST_BENCH_JSON when set.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch

_results: dict[tuple[str, str, str], dict[str, "Measurement"]] = defaultdict(dict)


@dataclass
class Measurement:
    seconds: float
    bytes_moved: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        return None if not self.bytes_moved else self.bytes_moved / self.seconds / 1e9


def bench_device() -> torch.device:
    """PYFAST_BENCH_DEVICE, else cuda when available, else cpu."""
    name = os.environ.get("PYFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_op(device: torch.device):
    """A refinement head's layer, (4096 x 256) @ (256 x 256) on torch's own threads: run untimed before
    each timed call of an "interleaved" case, as pyfast follows a torch op in training."""
    a = torch.randn(4096, 256, device=device)
    w = torch.randn(256, 256, device=device)
    out = torch.empty(4096, 256, device=device)

    def op():  # returns None: pytest-benchmark would take a returned value as the call's arguments
        torch.mm(a, w, out=out)
        synchronize(device)

    return op


def measure(benchmark, *, op: str, case: str, phase: str, impl: str, fn, device: torch.device,
            bytes_moved: int | None = None, rounds: int | None = None, extra: dict | None = None,
            setup=None) -> Measurement:
    """Times fn() (synchronized on CUDA) with pytest-benchmark and records the median. `setup`, when
    given, runs untimed before every round (e.g. the torch op a loss follows in training)."""

    def run():
        fn()
        synchronize(device)

    run()  # warm-up outside the timed rounds: compilation, first allocations
    run()
    if rounds is None and setup is None:
        benchmark(run)
    else:
        benchmark.pedantic(run, setup=setup, rounds=rounds or 100, iterations=1, warmup_rounds=1)
    result = Measurement(benchmark.stats.stats.median, bytes_moved, dict(extra or {}))
    benchmark.extra_info.update(op=op, case=case, phase=phase, impl=impl, device=str(device))
    if result.gbps is not None:
        benchmark.extra_info["GB/s"] = round(result.gbps, 2)
    benchmark.extra_info.update(result.extra)
    _results[(op, case, phase)][impl] = result
    return result


def saved_tensor_bytes(fn, inputs) -> int:
    """Bytes autograd saves for backward while running fn(), not counting the inputs themselves.

    This is the memory a loss holds between forward and backward: O(N) for the fused ops,
    O(N*M) for an eager composition of elementwise ops.
    """
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for a memory-bound op."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / 20
    return 2 * src.numel() * 4 / seconds / 1e9


def _fmt_ratio(base: Measurement | None, fused: Measurement | None) -> str:
    if base is None or fused is None:
        return "-"
    return f"{base.seconds / fused.seconds:.2f}x"


# Tables a benchmark module adds after the common one: functions of the terminal reporter, run at
# the end of the session (a module fixture's teardown would write into captured output).
summary_tables: list = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    tr = terminalreporter
    tr.section("pyfast: fused vs eager vs torch.compile (medians of this run)")
    header = f"{'op':<10} {'case':<24} {'phase':<9} {'fused ms':>10} {'eager ms':>10} {'compile ms':>10} " \
             f"{'vs eager':>9} {'vs compile':>10} {'fused GB/s':>10}"
    tr.write_line(header)
    rows = []
    for (op, case, phase), impls in _results.items():
        fused, eager, comp = impls.get("fused"), impls.get("eager"), impls.get("compile")
        ms = lambda m: f"{m.seconds * 1e3:.3f}" if m else "-"  # noqa: E731
        gbps = f"{fused.gbps:.1f}" if fused and fused.gbps else "-"
        tr.write_line(f"{op:<10} {case:<24} {phase:<9} {ms(fused):>10} {ms(eager):>10} {ms(comp):>10} "
                      f"{_fmt_ratio(eager, fused):>9} {_fmt_ratio(comp, fused):>10} {gbps:>10}")
        extras = {impl: m.extra for impl, m in impls.items() if m.extra}
        if extras:
            tr.write_line(f"{'':<10} {'':<24} {'':<9} extra: {extras}")
        rows.append({"op": op, "case": case, "phase": phase,
                     **{f"{impl}_s": m.seconds for impl, m in impls.items()},
                     **({"fused_gbps": fused.gbps} if fused and fused.gbps else {}),
                     **({"extra": extras} if extras else {})})
    for table in summary_tables:
        table(tr)
    path = os.environ.get("PYFAST_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"device": str(bench_device()), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
