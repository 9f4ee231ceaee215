"""MemoryMonitor: sampling cadence, fields, files, resume, fallbacks, and a real descriptor leak."""

import glob
import json
import os
import tempfile

import psutil
import pytest
import torch

from pyfast.memory import FIELDS, LeakRule, MemoryMonitor, diagnose, load_run, write_memory_plot
from pyfast.memory.files import REPORT_FILE, SAMPLES_FILE, read_samples

SMALL = LeakRule(warmup_steps=10, window=30, min_samples=15, min_steps=20)


def test_samples_every_n_steps_with_every_field():
    monitor = MemoryMonitor(every=5, investigate=False)
    taken = [monitor.step(step) for step in range(1, 21)]
    assert [s["step"] for s in taken if s is not None] == [5, 10, 15, 20]
    assert all(s is None for i, s in enumerate(taken, 1) if i % 5)
    sample = taken[-1]
    assert set(sample) == set(FIELDS)
    rss = psutil.Process().memory_info().rss / 2**20
    assert sample["rss_mb"] == pytest.approx(rss, rel=0.2)
    if hasattr(psutil.Process().memory_info(), "shared"):
        assert 0 < sample["anon_mb"] <= sample["rss_mb"]
    assert isinstance(sample["fds"], int) and sample["fds"] > 2
    assert sample["segment"] == 0 and sample["sample_ms"] > 0
    if not torch.cuda.is_initialized():
        assert sample["cuda_allocated_mb"] is None and sample["cuda_peak_mb"] is None
    assert monitor.series()["step"] == [5, 10, 15, 20] and len(monitor) == 4


def test_step_numbers_default_to_a_counter_and_repeats_are_skipped():
    monitor = MemoryMonitor(every=2, rule=SMALL, investigate=False)
    assert [monitor.step() is not None for _ in range(4)] == [False, True, False, True]
    assert monitor.step(4) is None  # that step has its sample (e.g. gradient accumulation)
    assert monitor.sample() is None
    assert monitor.sample(5)["step"] == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every"),
    ({"every": 2.5}, "every"),
    ({"investigate_steps": 1, "every": 5}, "investigate_steps"),
    ({"max_investigations": -1}, "max_investigations"),
    ({"tracemalloc_frames": -2}, "tracemalloc_frames"),
    ({"full_info_budget": 2.0}, "full_info_budget"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemoryMonitor(**kwargs)
    with pytest.raises(TypeError, match="rule"):
        MemoryMonitor(rule={"host_mb": 1})
    with pytest.raises(ValueError, match="min_steps"):
        MemoryMonitor(every=1, rule=LeakRule(window=30, min_samples=15, min_steps=100))


def test_check_rejects_a_bad_bound_and_stays_quiet_without_evidence():
    monitor = MemoryMonitor(every=1, rule=SMALL, investigate=False)
    monitor.step(1)
    assert monitor.check(1.0) is None
    for bad in (0, -1, float("inf"), "10"):
        with pytest.raises(ValueError, match="max_growth"):
            monitor.check(bad)


def test_files_hold_every_sample_and_the_same_verdict(tmp_path):
    monitor = MemoryMonitor(every=1, rule=SMALL, out_dir=tmp_path, investigate=False)
    for step in range(1, 61):
        monitor.step(step)
        if step == 1:
            first = json.loads((tmp_path / REPORT_FILE).read_text())  # written at the first sample
            assert first["rule"]["window"] == 30 and first["every"] == 1
    verdict = monitor.close()
    samples, report = load_run(tmp_path)
    assert samples == json.loads(json.dumps(monitor.samples))
    assert report["verdict"] == verdict
    recomputed, text = diagnose(tmp_path)
    assert recomputed["series"] == verdict["series"] and recomputed["status"] == verdict["status"]
    assert f"{len(samples)} memory samples" in text


def test_resume_keeps_the_series_and_starts_a_new_segment(tmp_path):
    first = MemoryMonitor(every=5, out_dir=tmp_path, investigate=False)
    for step in range(1, 31):
        first.step(step)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON-able Python
    torch.save(state, tmp_path / "state.pt")
    for step in range(31, 51):  # samples after the checkpoint, then the process dies
        first.step(step)
    assert [s["step"] for s in read_samples(tmp_path / SAMPLES_FILE)][-1] == 50

    resumed = MemoryMonitor(every=5, out_dir=tmp_path, investigate=False)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [s["step"] for s in read_samples(tmp_path / SAMPLES_FILE)] == [5, 10, 15, 20, 25, 30]
    for step in range(31, 46):
        resumed.step(step)
    steps = [(s["step"], s["segment"]) for s in read_samples(tmp_path / SAMPLES_FILE)]
    assert steps == [(s, 0) for s in (5, 10, 15, 20, 25, 30)] + [(s, 1) for s in (35, 40, 45)]
    assert resumed.samples == read_samples(tmp_path / SAMPLES_FILE)
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"series": {}})


def test_unavailable_uss_is_stated_once_and_rss_still_sampled(monkeypatch):
    messages = []
    monitor = MemoryMonitor(every=1, rule=SMALL, investigate=False, full_info_budget=1.0, log=messages.append)

    def denied():
        raise psutil.AccessDenied(os.getpid())

    monkeypatch.setattr(monitor._probe.process, "memory_full_info", denied)
    samples = [monitor.step(step) for step in range(1, 6)]
    assert all(s["uss_mb"] is None and s["rss_mb"] > 0 for s in samples)
    uss_notes = [m for m in messages if "USS is unavailable" in m]
    assert len(uss_notes) == 1 and "AccessDenied" in uss_notes[0]
    assert any("USS is unavailable" in n for n in monitor.verdict()["notes"])


def test_uss_reads_follow_the_time_budget():
    never = MemoryMonitor(every=1, rule=SMALL, investigate=False, full_info_budget=0.0)
    always = MemoryMonitor(every=1, rule=SMALL, investigate=False, full_info_budget=1.0)
    assert all(never.step(s)["uss_mb"] is None for s in range(1, 4))
    assert all(always.step(s)["uss_mb"] > 0 for s in range(1, 4))


def test_a_descriptor_leak_is_found(tmp_path):
    opened = []
    monitor = MemoryMonitor(every=2, rule=SMALL, investigate=False)
    try:
        for step in range(1, 121):
            opened.append(open(tmp_path / f"f{step}", "w"))  # noqa: SIM115 - the planted leak
            monitor.step(step)
        verdict = monitor.verdict()
        assert "fds" in verdict["leaking"]
        assert verdict["series"]["fds"]["slope"] == pytest.approx(1000, rel=0.05)  # one per step
        assert monitor.check(100.0) is None  # check() bounds memory growth, not descriptors
    finally:
        for handle in opened:
            handle.close()


def test_dataloader_workers_are_counted():
    dataset = torch.utils.data.TensorDataset(torch.arange(64.0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    monitor = MemoryMonitor(every=1, rule=SMALL, investigate=False, full_info_budget=1.0)
    iterator = iter(loader)
    next(iterator)
    sample = monitor.step(1)
    assert sample["workers"] >= 2 and sample["workers_rss_mb"] > 0
    assert sample["workers_uss_mb"] is not None and sample["workers_uss_mb"] > 0
    assert sample["workers_key"] is not None
    del iterator, loader


def test_plot_is_written(tmp_path):
    monitor = MemoryMonitor(every=1, rule=SMALL, investigate=False)
    for step in range(1, 61):
        monitor.step(step)
    path = write_memory_plot(monitor.samples, tmp_path / "memory.png", monitor.verdict())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_memory_plot([], tmp_path / "none.png") is None


def test_summary_is_compact_and_json_ready():
    monitor = MemoryMonitor(every=1, rule=SMALL, investigate=False)
    for step in range(1, 61):
        monitor.step(step)
    summary = monitor.summary()
    assert set(summary) >= {"status", "leak", "leaking", "host_mb_per_1000_steps", "fds_per_1000_steps",
                            "top_grower", "message"}
    json.dumps(summary, allow_nan=False)


def census_files():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pyfast-census-*")))


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """Census files in a folder of this test's own: other processes' searches cannot show up in it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_close_without_waiting_cancels_a_search_under_way(own_tempdir):
    before = census_files()
    rule = LeakRule(host_mb=1.0, warmup_steps=2, window=20, min_samples=10, min_steps=10)
    monitor = MemoryMonitor(every=1, rule=rule, investigate_steps=50, tracemalloc_frames=0, log=lambda m: None)
    kept = []
    step = 0
    while monitor._search is None and step < 200:  # grow until a search starts
        step += 1
        kept.append(bytearray(1 << 20))
        monitor.step(step)
    assert monitor._search is not None
    verdict = monitor.close(wait=False)
    assert monitor._search is None and monitor.report()["investigations"] == []
    assert verdict["investigations"] == 0
    assert census_files() <= before  # the census handed over through a file: removed
