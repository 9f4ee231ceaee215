import json

import pytest

from pyfast.data import SkippedSample, SkipTracker, TooManyBadSamples


def records(count, start=0, source="npz (x)"):
    return [SkippedSample(source=source, file=f"f{i}.npz", reason=f"reason {i}", index=i) for i in range(start, start + count)]


def test_just_under_the_bound_passes_and_just_over_raises_with_the_fraction(tmp_path):
    tracker = SkipTracker(200, max_fraction=0.05, log_path=tmp_path / "skipped.jsonl")
    assert tracker.record(records(10)) == 10  # 5.0% exactly: not over the bound
    assert tracker.count == 10
    with pytest.raises(TooManyBadSamples) as error:
        tracker.record(records(1, start=10))
    message = str(error.value)
    assert "11 of 200" in message and "5.50%" in message and "5.00%" in message
    assert "f0.npz (reason 0)" in message and "skipped.jsonl" in message
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 11  # logged before aborting


def test_each_bad_sample_is_counted_and_logged_once(tmp_path):
    log = tmp_path / "out" / "skipped.jsonl"
    tracker = SkipTracker(100, max_fraction=0.5, log_path=log)
    assert tracker.record(records(3)) == 3
    assert tracker.record(records(3)) == 0  # the next epoch meets them again
    assert tracker.record(records(2, source="other")) == 2  # same index, other source: a different sample
    assert tracker.count == 5
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["source"], line["file"], line["reason"]) for line in lines[:3]] == [
        ("npz (x)", "f0.npz", "reason 0"), ("npz (x)", "f1.npz", "reason 1"), ("npz (x)", "f2.npz", "reason 2")]
    assert len(lines) == 5


def test_resume_counts_the_records_already_logged(tmp_path):
    log = tmp_path / "skipped.jsonl"
    SkipTracker(100, max_fraction=0.5, log_path=log).record(records(4))
    resumed = SkipTracker(100, max_fraction=0.5, log_path=log, resume=True)
    assert resumed.count == 4
    assert resumed.record(records(5)) == 1
    assert len(log.read_text().splitlines()) == 5


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="max_fraction"):
        SkipTracker(10, max_fraction=1.5)
    with pytest.raises(ValueError, match="total_samples"):
        SkipTracker(-1)
    with pytest.raises(TooManyBadSamples):
        SkipTracker(10, max_fraction=0.0).record(records(1))
