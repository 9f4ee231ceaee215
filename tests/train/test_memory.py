"""The memory monitor inside pyfast-train: a planted leak named, a clean run not flagged,
--max-memory-growth stopping with a checkpoint, the monitor's state carried over a resume."""

import json
import os
import signal
import sys
import types

import pytest
import torch

from pyfast.cli.doctor import main as doctor
from pyfast.cli.train import main
from pyfast.memory.probes import trim_heap
from pyfast.models import TinyBackbone
from pyfast.train.checkpoint import load_checkpoint
from pyfast.train.memory import RunMemory
from pyfast.train.metrics import read_jsonl

LEAKY_MODULE = "pyfast_test_leaky"
# About 110 training samples, 2 per step: 55 steps in one epoch, the backbone run on every step (no cache).
# A short leak rule sampled every step, with a bound far above a clean run's ups and downs; the
# planted leak keeps 1 MB per step, 20 times the bound.
ARGS = [
    "--data", "synthetic:,num_samples=126,image_size=32", "--image-size", "32", "--batch-size", "2",
    "--roi-size", "4", "--hidden", "8", "--epochs", "1", "--cache-dir", "off", "--workers", "0", "--no-progress",
    "--memory-every", "1", "--memory-rule", "warmup_steps=10,window=30,min_samples=15,min_steps=20,host_mb=50",
]  # fmt: skip


class KeepingBackbone(TinyBackbone):
    """A user's backbone that keeps a 1 MB tensor of every call in a module-level list."""

    calls = 0
    signal_at = None  # send SIGTERM to this process on this call (the interruption test)

    def __init__(self):
        super().__init__(channels=(8,), strides=(2,))

    def forward(self, images):
        type(self).calls += 1
        if type(self).calls == type(self).signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        sys.modules[LEAKY_MODULE].KEPT.append(torch.ones(2**18))
        return super().forward(images)


class CleanBackbone(TinyBackbone):
    def __init__(self):
        super().__init__(channels=(8,), strides=(2,))


@pytest.fixture
def backbones(monkeypatch):
    module = types.ModuleType(LEAKY_MODULE)
    module.KEPT = []
    module.Keeping, module.Clean = KeepingBackbone, CleanBackbone
    monkeypatch.setitem(sys.modules, LEAKY_MODULE, module)
    monkeypatch.setattr(KeepingBackbone, "calls", 0)
    import gc

    gc.collect()  # what earlier tests left is freed and handed back now, not in the middle of a run
    trim_heap()
    yield module
    module.KEPT.clear()


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_a_planted_leak_is_detected_and_named(tmp_path, backbones, capsys):
    run = tmp_path / "run"
    assert main(ARGS + ["--backbone", f"{LEAKY_MODULE}:Keeping", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    summary = _summary(run)
    steps, memory = summary["steps"], summary["memory"]
    assert steps >= 50 and summary["status"] == "completed"
    assert memory["leak"] and memory["leaking"] == ["host"], memory["message"]
    assert memory["host_mb_per_1000_steps"] > 10 * 50  # about 1000: 1 MB a step
    assert memory["top_grower"].startswith(f"{LEAKY_MODULE}.KEPT holds")
    assert memory["every"] == 1 and memory["samples"] == steps and memory["stopped"] is None
    table_row = next(line for line in out.splitlines() if line.startswith("memory (per 1000 steps)"))
    assert "LEAK: host +" in table_row and f"{LEAKY_MODULE}.KEPT" in table_row
    # every step's record carries its memory sample; the validation record the latest one
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["memory"]["rss_mb"] > 0 for r in records] == [True] * steps
    assert records[-1]["memory"]["anon_mb"] - records[20]["memory"]["anon_mb"] > 0.5 * (steps - 21)
    assert read_jsonl(run / "val.jsonl")[-1]["memory"]["status"] == "leak"
    assert (run / "plots" / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_jsonl(run / "memory.jsonl")) == steps
    assert doctor(["memory", str(run)]) == 1
    assert f"{LEAKY_MODULE}.KEPT" in capsys.readouterr().out


def test_a_clean_run_is_not_flagged(tmp_path, backbones, capsys):
    run = tmp_path / "run"
    assert main(ARGS + ["--backbone", f"{LEAKY_MODULE}:Clean", "--out", str(run)]) == 0
    memory = _summary(run)["memory"]
    assert memory["status"] == "ok" and not memory["leak"], memory["message"]
    assert abs(memory["host_mb_per_1000_steps"]) < 50
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory (per 1000 steps)"))
    assert row.split(None, 4)[-1].startswith("ok: host")


def test_max_memory_growth_stops_the_run_and_keeps_a_checkpoint(tmp_path, backbones, capsys):
    run = tmp_path / "run"
    code = main(ARGS + ["--backbone", f"{LEAKY_MODULE}:Keeping", "--out", str(run), "--max-memory-growth", "200"])
    err = capsys.readouterr().err
    assert code == 3, err
    summary = _summary(run)
    assert summary["status"] == "stopped: memory growth" and summary["stopped_by"] == "max_memory_growth"
    assert summary["steps"] < summary["steps_per_epoch"]
    assert "host memory" in summary["memory"]["stopped"] and "over the bound of 200 MB" in summary["memory"]["stopped"]
    assert err.startswith(f"pyfast-train: error: memory growth stopped the run at step {summary['steps']}")
    assert "--max-memory-growth" in err and "pyfast-doctor memory" in err
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["progress"]["step"] == summary["steps"]
    assert len(checkpoint["memory"]["series"]["step"]) == summary["steps"]
    assert len(read_jsonl(run / "metrics.jsonl")) == summary["steps"]


def test_resume_keeps_the_monitor_state(tmp_path, backbones):
    run = tmp_path / "run"
    assert main(ARGS + ["--backbone", f"{LEAKY_MODULE}:Keeping", "--out", str(run), "--max-steps", "50"]) == 0
    before = _summary(run)["memory"]
    assert before["leak"] and before["top_grower"].startswith(f"{LEAKY_MODULE}.KEPT"), before["message"]
    # A few steps more in a new process (the memory settings may change on a resume).
    assert main(["--resume", str(run), "--max-steps", "53", "--max-memory-growth", "100000", "--no-progress"]) == 0
    after = _summary(run)["memory"]
    samples = read_jsonl(run / "memory.jsonl")
    assert [s["step"] for s in samples] == list(range(1, 54))
    assert {s["segment"] for s in samples[:50]} == {0} and {s["segment"] for s in samples[50:]} == {1}
    # Three samples of the new process cannot be judged: the verdict is still the first process's,
    # with the grower its search found.
    assert after["leak"] and after["judged_steps"] == before["judged_steps"]
    assert after["top_grower"] == before["top_grower"]
    assert after["samples"] == 53 and after["max_growth"] == 100000
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["memory"]["segment"] == 1 and len(checkpoint["memory"]["investigations"]) >= 1


def test_sigterm_closes_the_monitor_without_waiting(tmp_path, backbones, monkeypatch):
    waits = []
    finish = RunMemory.finish
    monkeypatch.setattr(RunMemory, "finish", lambda self, wait: waits.append(wait) or finish(self, wait))
    monkeypatch.setattr(KeepingBackbone, "signal_at", 30)  # the probe's call, then 29 steps (a search under way)
    run = tmp_path / "run"
    assert main(ARGS + ["--backbone", f"{LEAKY_MODULE}:Keeping", "--out", str(run)]) == 128 + signal.SIGTERM
    assert waits == [False]
    summary = _summary(run)
    assert summary["status"] == "interrupted (SIGTERM)" and summary["steps"] == 29
    assert len(load_checkpoint(run / "checkpoints" / "last.pt")["memory"]["series"]["step"]) == 29
    assert json.loads((run / "memory.json").read_text())["verdict"]["samples"] == 29
