"""Planted leaks in real loops, each flagged with the right grower named; a clean warm-up is not."""

import gc

import pytest
import torch

from pyfast.cli.doctor import main as doctor
from pyfast.memory import LeakRule, MemoryMonitor, format_verdict
from pyfast.memory.probes import trim_heap

from . import leaks

# Short windows for seconds-long tests; the leaks grow hundreds of MB per 1000 steps. The loops run
# well past the search for growers: the allocators first reuse memory freed around it (a plateau),
# and the judged window must lie beyond that.
RULE = LeakRule(host_mb=50.0, warmup_steps=10, window=30, min_samples=15, min_steps=40)


def monitored(step_fn, steps, tmp_path=None, every=2, investigate_steps=10, investigate=True, rule=RULE,
              tracemalloc_frames=25):
    gc.collect()  # what earlier tests left in cycles is freed now, not in the middle of this loop,
    trim_heap()  # and handed back: freed memory would otherwise absorb leaked MB without RSS moving
    monitor = MemoryMonitor(every=every, rule=rule, out_dir=tmp_path, investigate=investigate,
                            investigate_steps=investigate_steps, tracemalloc_frames=tracemalloc_frames,
                            log=lambda message: None)
    for step in range(1, steps + 1):
        step_fn(step)
        monitor.step(step)
    return monitor, monitor.close()


def explain(monitor, verdict) -> str:
    """The verdict and the host series, for a failing assertion's message."""
    series = ", ".join(f"{s['step']}:{s['anon_mb'] or s['rss_mb']:.1f}" for s in monitor.samples)
    return f"{format_verdict(verdict)}\nhost MB by step: {series}"


def line_of(module, text):
    """`tests/memory/leaks.py:N`-style site of the line of `module` holding `text`."""
    import inspect
    import os

    lines, _ = inspect.getsourcelines(module)
    number = next(i for i, line in enumerate(lines, 1) if text in line)
    return f"{os.path.relpath(module.__file__)}:{number}"


@pytest.fixture
def model():
    torch.manual_seed(0)
    head = leaks.Head()
    return head, torch.optim.SGD(head.parameters(), lr=0.01)


def test_backbone_keeping_its_outputs_in_a_global_list(model, tmp_path, capsys):
    head, optimizer = model
    backbone = leaks.KeepingBackbone()
    try:
        monitor, verdict = monitored(lambda step: leaks.train_step(backbone, head, optimizer), 140, tmp_path)
        assert verdict["leak"] and "host" in verdict["leaking"], explain(monitor, verdict)
        assert verdict["series"]["host"]["slope"] > 5 * RULE.host_mb  # 1.2 MB per step
        growers = verdict["growers"]
        top = growers["held_by"][0]
        assert top["holder"].endswith("leaks.KEPT_OUTPUTS") and top["holder_type"] == "list"
        assert top["len_delta"] == 10  # one output per step of the 10-step search
        # New objects are told by id, and an id freed by a transient object can come back for a
        # kept one: the holder's new objects may miss one or two.
        assert list(top["new"]) == ["torch.Tensor"] and 8 <= top["new"]["torch.Tensor"] <= 10
        assert top["retained_bytes"] >= 8 * 2 * 16 * 96 * 96 * 4
        assert growers["by_bytes"][0]["type"] == "torch.Tensor"
        assert any(g["type"] == "torch.Tensor" and g["count_delta"] >= 10 for g in growers["by_count"])
        assert any(site["site"] == line_of(leaks, "features = self.conv(images)") for site in growers["sites"][:3])
        assert monitor.check(RULE.host_mb) is not None

        assert doctor(["memory", str(tmp_path)]) == 1
        out = capsys.readouterr().out
        assert "LEAK" in out and "leaks.KEPT_OUTPUTS" in out and "torch.Tensor" in out
    finally:
        leaks.KEPT_OUTPUTS.clear()


def test_validation_outputs_appended_without_bound(model):
    head, optimizer = model
    backbone = torch.nn.Conv2d(3, 16, 3, padding=1).requires_grad_(False)
    validator = leaks.Validator()

    def step_fn(step):
        leaks.train_step(backbone, head, optimizer)
        if step % 2 == 0:
            validator.validate(head)

    monitor, verdict = monitored(step_fn, 140)
    assert verdict["leak"] and "host" in verdict["leaking"], explain(monitor, verdict)
    top = verdict["growers"]["held_by"][0]
    assert top["holder"].endswith("leaks.Validator.outputs") and list(top["new"]) == ["dict"]
    assert top["len_delta"] == 5  # one validation every 2 steps of the 10-step search
    tensors = next(kind["count"] for kind in top["retains"] if kind["type"] == "torch.Tensor")
    assert top["new"]["dict"] <= tensors <= 2 * top["new"]["dict"]  # logits and target per output
    assert verdict["growers"]["by_bytes"][0]["type"] == "torch.Tensor"


def test_figures_never_closed():
    import matplotlib.pyplot as plt

    plt.close("all")
    try:
        # Censuses only: tracemalloc slows figure-making down tenfold (the other leaks test its sites).
        rule = LeakRule(host_mb=50.0, warmup_steps=10, window=45, min_samples=15, min_steps=40)
        monitor, verdict = monitored(leaks.draw_and_forget, 65, every=1, investigate_steps=5, rule=rule,
                                     tracemalloc_frames=0)
        assert verdict["leak"] and "host" in verdict["leaking"], explain(monitor, verdict)
        top = verdict["growers"]["held_by"][0]
        assert top["holder"] == "matplotlib._pylab_helpers.Gcf.figs"
        first, last = verdict["growers"]["steps"]
        # One figure per step of the search; a forked census may land before the last step's figure.
        assert last - first == 5 and 4 <= top["len_delta"] <= 5
        managers = top["new"]["matplotlib.backend_bases.FigureManagerBase"]
        figures = next(kind["count"] for kind in top["retains"] if kind["type"] == "matplotlib.figure.Figure")
        assert 4 <= figures <= 5 and 4 <= managers <= 5  # a forked census may cut one figure short
        assert verdict["growers"]["tracemalloc"] is False and verdict["growers"]["sites"] == []
    finally:
        plt.close("all")


def test_clean_loop_with_a_warm_up_that_flattens_is_not_a_leak(model):
    head, optimizer = model
    backbone = torch.nn.Conv2d(3, 16, 3, padding=1).requires_grad_(False)
    cache = leaks.WarmingCache(fill_steps=40)  # +10 MB over 40 steps, then flat

    def step_fn(step):
        cache.step(step)
        leaks.train_step(backbone, head, optimizer)

    monitor, verdict = monitored(step_fn, 200)
    assert not verdict["leak"] and verdict["status"] == "ok", explain(monitor, verdict)
    assert verdict["growers"] is None  # a search may have looked at the warm-up: no leak, no growers
    assert monitor.check(RULE.host_mb) is None
    assert len(cache.entries) == 40
