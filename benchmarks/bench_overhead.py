"""Small calls, where the op layer's own time (Python, the dispatcher) is most of a call: box loss
at N=16 and 4,096 (forward without grad, forward recording the graph, forward + backward) and the
mask loss on 8 masks of 64x64 (forward + backward), on one torch thread.

    python benchmarks/bench_overhead.py                          # this tree
    PYFAST_BENCH_BEFORE=/path/to/other/tree python benchmarks/bench_overhead.py
                                                                 # and another tree, alternating
    pytest benchmarks/bench_overhead.py --benchmark-only         # this tree, as the other benchmarks

Each tree runs in fresh processes (`--one TREE`), alternately, five rounds by default
(PYFAST_BENCH_ROUNDS). In a process, the cases take turns in batches of 50 calls and each reports
its fastest batch mean, so that noise from other processes on the machine inflates no case more
than another; the table gives the median over the rounds. The other tree may be an older pyfast:
only the public pyfast.box_loss and pyfast.mask_loss are called.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
BOX_SIZES = (16, 4096)


def cases():
    """name -> a function running one call of that case."""
    import torch

    import pyfast

    g = torch.Generator().manual_seed(0)
    out = {}
    for n in BOX_SIZES:
        xy = torch.rand(n, 2, generator=g) * 100
        pred = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 50 + 1], 1)
        target = pred + torch.randn(n, 4, generator=g)
        leaf = pred.clone().requires_grad_()

        def forward(pred=pred, target=target):
            with torch.no_grad():
                pyfast.box_loss(pred, target, mode="giou")

        out[f"box N={n} forward"] = forward
        out[f"box N={n} forward, graph"] = lambda leaf=leaf, target=target: pyfast.box_loss(leaf, target, mode="giou")
        out[f"box N={n} forward+backward"] = lambda leaf=leaf, target=target: pyfast.box_loss(
            leaf, target, mode="giou"
        ).backward()
    logits = torch.randn(8, 64, 64, generator=g).requires_grad_()
    masks = torch.rand(8, 64, 64, generator=g) > 0.5
    out["mask 8x64x64 forward+backward"] = lambda: pyfast.mask_loss(logits, masks.to(torch.uint8)).backward()
    return out


def time_cases(batches: int = 40, calls: int = 50) -> dict[str, float]:
    """Microseconds per call of each case: the fastest of `batches` batch means, cases interleaved."""
    import torch

    torch.set_num_threads(1)
    fns = cases()
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        for _ in range(calls):
            fn()
    for _ in range(batches):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best


def run_in(tree: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": tree}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--one"], env=env, cwd=tree,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"{tree}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_all(before: str | None, rounds: int) -> dict[str, dict[str, float]]:
    """label -> case -> median microseconds over `rounds` processes per tree."""
    trees = ([("before", before)] if before else []) + [("after", TREE)]
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    for _ in range(rounds):
        for label, tree in trees:
            runs[label].append(run_in(tree))
    return {label: {case: statistics.median(r[case] for r in rs) for case in rs[0]} for label, rs in runs.items()}


def format_table(results: dict[str, dict[str, float]]) -> str:
    before = results.get("before")
    lines = ["| case | " + ("before µs | after µs | after / before |" if before else "µs |"),
             "|---|" + ("---:|---:|---:|" if before else "---:|")]  # fmt: skip
    for case, after in results["after"].items():
        if before:
            lines.append(f"| {case} | {before[case]:.1f} | {after:.1f} | {after / before[case]:.3f} |")
        else:
            lines.append(f"| {case} | {after:.1f} |")
    return "\n".join(lines)


@pytest.mark.parametrize("case", ["box N=16 forward+backward", "box N=4096 forward+backward",
                                  "mask 8x64x64 forward+backward"])  # fmt: skip
def test_small_call(benchmark, case):
    import torch

    from conftest import measure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measure(benchmark, op="overhead", case=case, phase="full", impl="fused", fn=cases()[case],
                device=torch.device("cpu"), rounds=2000)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    if sys.argv[1:] == ["--one"]:
        print(json.dumps(time_cases()))
        sys.exit(0)
    rounds = int(os.environ.get("PYFAST_BENCH_ROUNDS", "5"))
    print(f"one torch thread, {rounds} rounds of fresh processes per tree, medians of per-process best batch means")
    print(format_table(run_all(os.environ.get("PYFAST_BENCH_BEFORE"), rounds)))
