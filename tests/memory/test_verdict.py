"""The leak rule on synthetic series: leaks, noise, warm-ups that flatten, one-off steps."""

import numpy as np
import pytest

from pyfast.memory.verdict import LeakRule, assess, build_verdict, passes

RULE = LeakRule()  # the documented defaults: 10 MB / 1000 steps, 200 warm-up steps, 60-sample window
EVERY = 10


def samples(values, field="anon_mb", every=EVERY, start=EVERY, segment=0, **extra):
    steps = start + every * np.arange(len(values))
    out = []
    for i, (step, value) in enumerate(zip(steps, values)):
        record = {"step": int(step), "segment": segment, field: float(value), "fds": 40}
        record.update({k: v[i] if isinstance(v, (list, np.ndarray)) else v for k, v in extra.items()})
        out.append(record)
    return out


def host(verdict):
    return verdict["series"]["host"]


def noise(n, sigma, seed=0):
    return np.random.default_rng(seed).normal(0, sigma, n)


def test_linear_leak_with_noise_is_a_leak_with_its_slope_in_the_interval():
    steps = EVERY * np.arange(1, 201)
    verdict = build_verdict(samples(800 + 0.05 * steps + noise(200, 2.0)), RULE)  # 50 MB / 1000 steps
    assert verdict["leak"] and verdict["leaking"] == ["host"]
    fit = host(verdict)
    assert fit["status"] == "leak" and fit["ci"][0] <= 50 <= fit["ci"][1]
    assert fit["slope"] == pytest.approx(50, rel=0.1) and fit["positive_fraction"] > 0.9
    assert fit["samples"] == RULE.window and fit["steps"] == [int(steps[-60]), int(steps[-1])]


def test_flat_noisy_series_is_ok():
    verdict = build_verdict(samples(900 + noise(300, 5.0, seed=3)), RULE)
    assert verdict["status"] == "ok" and not verdict["leak"]
    assert abs(host(verdict)["slope"]) < RULE.host_mb


def test_growth_that_flattens_after_warm_up_is_no_leak():
    steps = EVERY * np.arange(1, 201)
    # the allocator and caches fill up: +600 MB, three quarters of it in the first 400 steps
    values = 500 + 600 * (1 - np.exp(-steps / 300.0)) + noise(200, 1.0, seed=4)
    verdict = build_verdict(samples(values), RULE)
    assert not verdict["leak"] and verdict["status"] == "ok"


def test_a_warm_up_still_levelling_off_is_growing_not_a_leak():
    steps = EVERY * np.arange(1, 161)
    values = 500 + 600 * (1 - np.exp(-steps / 300.0))  # at step 1600 still +10..70 MB per 1000 steps
    fit = host(build_verdict(samples(values), RULE))
    assert fit["status"] == "growing" and fit["slope"] > RULE.host_mb
    assert fit["half_slopes"][1] < fit["half_slopes"][0] / 2  # it slows down: levelling off
    # the same growth, linear, is a leak
    linear = host(build_verdict(samples(500 + fit["slope"] / 1000 * steps), RULE))
    assert linear["status"] == "leak"


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_a_one_off_step_is_not_a_leak(where):
    values = 900 + noise(150, 1.0, seed=5)
    jump_at = 150 - int(RULE.window * (1 - where))
    values[jump_at:] += 300.0  # a buffer allocated once, e.g. by the first validation
    fit = host(build_verdict(samples(values), RULE))
    assert fit["status"] != "leak"
    assert fit["half_slopes"] is None or min(fit["half_slopes"]) < RULE.host_mb / 2


def test_a_staircase_is_a_leak():
    # +20 MB at every validation, every 50 steps (validation outputs kept): sustained growth
    steps = EVERY * np.arange(1, 201)
    values = 800 + 20.0 * (steps // 50) + noise(200, 1.0, seed=6)
    fit = host(build_verdict(samples(values), RULE))
    assert fit["status"] == "leak" and fit["slope"] == pytest.approx(400, rel=0.2)


def test_spikes_do_not_make_a_leak():
    values = 900 + noise(200, 1.0, seed=7)
    spikes = np.random.default_rng(8).choice(200, 20, replace=False)
    values[spikes] += 500.0  # validation briefly holds a big batch
    assert build_verdict(samples(values), RULE)["status"] == "ok"


def test_slow_growth_under_the_bound_is_ok_even_when_certain():
    steps = EVERY * np.arange(1, 201)
    fit = host(build_verdict(samples(800 + 0.004 * steps + noise(200, 0.05, seed=9)), RULE))  # 4 MB / 1000
    assert fit["status"] == "ok" and fit["ci"][0] > 0 and fit["slope"] < RULE.host_mb


def test_a_leak_that_starts_late_is_growing_first_then_a_leak():
    steps = EVERY * np.arange(1, 301)
    values = 800 + 0.05 * np.clip(steps - 2400, 0, None) + noise(300, 0.5, seed=10)
    early = build_verdict(samples(values[:275]), RULE)  # most of the window's first half is flat
    assert host(early)["status"] == "growing" and not early["leak"]
    assert build_verdict(samples(values), RULE)["leak"]


def test_too_few_samples_after_warm_up_is_insufficient():
    steps = EVERY * np.arange(1, 31)  # 300 steps: 10 samples after the 200 warm-up steps
    verdict = build_verdict(samples(800 + 0.5 * steps), RULE)
    assert verdict["status"] in ("insufficient", "growing") and not verdict["leak"]
    assert build_verdict(samples(800 + 0.5 * steps[:15]), RULE)["status"] == "insufficient"
    assert build_verdict([], RULE)["status"] == "insufficient"


def test_warm_up_counts_from_each_process_start_and_segments_are_judged_apart():
    steps = EVERY * np.arange(1, 151)
    leaking = samples(800 + 0.05 * steps)
    resumed = samples(600 + noise(150, 0.5, seed=11), start=int(steps[-1]) + EVERY, segment=1)
    verdict = build_verdict(leaking + resumed, RULE)  # the resumed process does not leak
    assert verdict["segment"] == 1 and not verdict["leak"]
    short = resumed[:10]  # too short to judge: the earlier process's verdict stands
    verdict = build_verdict(leaking + short, RULE)
    assert verdict["segment"] == 0 and verdict["leak"]


def test_workers_are_judged_on_the_current_set_of_workers():
    n = 200
    steps = EVERY * np.arange(1, n + 1)
    key = np.where(np.arange(n) < 100, 111, 222)  # the workers were replaced halfway
    sawtooth = np.where(np.arange(n) < 100, 300 + 0.2 * steps, 300 + 0.002 * (steps - steps[100]))
    flat = build_verdict(samples(np.full(n, 900.0), workers=2, workers_key=key, workers_uss_mb=sawtooth), RULE)
    assert flat["series"]["workers"]["status"] == "ok" and flat["series"]["workers"]["field"] == "workers_uss_mb"
    growing = build_verdict(samples(np.full(n, 900.0), workers=2, workers_key=111, workers_uss_mb=300 + 0.1 * steps), RULE)
    assert growing["leaking"] == ["workers"]


def test_descriptor_leak_and_missing_values():
    n = 150
    records = samples(np.full(n, 900.0))
    for i, record in enumerate(records):
        record["fds"] = 40 + i // 2  # one descriptor every 20 steps: 50 per 1000 steps
        record["uss_mb"] = None if i % 3 else 850.0  # read under a budget: often missing
    verdict = build_verdict(records, RULE)
    assert verdict["leaking"] == ["fds"] and verdict["series"]["fds"]["slope"] == pytest.approx(50)
    assert verdict["series"]["uss_mb"]["samples"] < RULE.window


def test_passes_applies_another_bound_without_refitting():
    steps = EVERY * np.arange(1, 201)
    fit = assess(steps, 800 + 0.05 * steps, RULE.host_mb, RULE)
    assert passes(fit, 40.0, RULE) and not passes(fit, 60.0, RULE)
    assert not passes({"status": "insufficient", "samples": 3}, 1.0, RULE)


@pytest.mark.parametrize("kwargs, message", [
    ({"host_mb": 0}, "host_mb"),
    ({"fds": float("nan")}, "fds"),
    ({"window": 10}, "window"),
    ({"min_samples": 4}, "min_samples"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"confidence": 1.0}, "confidence"),
])
def test_rule_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeakRule(**kwargs)


def test_rule_round_trips_through_a_dict():
    rule = LeakRule(host_mb=3.5, window=40, min_samples=10)
    assert LeakRule.from_dict({**rule.as_dict(), "unknown": 1}) == rule


def test_no_false_alarm_over_many_noisy_flat_runs_with_steps_and_spikes():
    rng = np.random.default_rng(12)
    for _ in range(60):
        sigma = rng.uniform(0.5, 10.0)
        values = 900 + rng.normal(0, sigma, 200)
        values[rng.integers(140, 200):] += rng.uniform(20, 500)  # one step inside the judged window
        values[rng.choice(200, 15, replace=False)] += rng.uniform(50, 500, 15)  # spikes
        assert not build_verdict(samples(values), RULE)["leak"]


def test_clear_leaks_are_found_over_many_noisy_runs():
    rng = np.random.default_rng(13)
    steps = EVERY * np.arange(1, 201)
    for _ in range(60):
        slope = rng.uniform(5, 20) * RULE.host_mb / 1000.0  # 5 to 20 times the bound
        assert build_verdict(samples(900 + slope * steps + rng.normal(0, 2.0, 200)), RULE)["leak"]
