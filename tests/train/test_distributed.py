"""pyfast-train over two gloo processes on CPU: the world-size-2 case of the same code.

The runs use 38 samples (33 training, 5 validation) in batches of 8: slots of 16 samples, 3 steps
an epoch, the last slot holding a single sample, so rank 0's part of it is empty (its step joins
the gradient all-reduce with zeros) and rank 1's loss is weighted by 2 * 1/1. Three of the samples
are unreadable npz files, met by either rank in any epoch: skipped, and counted once.

The ranks are forked from a fork server that imported torch and pyfast once (a fresh interpreter
spends seconds importing torch), never from the test process itself: after torch's OpenMP threads
have run there, a forked child can hang on their locks. The SIGTERM test runs the real torchrun.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp

import pyfast
from ddp_worker import RANK_TIMEOUT_S, free_port, run_rank
from pyfast.cli.train import main
from pyfast.train import DistributedError, World
from pyfast.train.metrics import read_jsonl
from pyfast.train.sharding import epoch_order, micro_slots, rank_batches, slot_weight

SAMPLES, BAD = 38, 3
CONFIG = {
    "image_size": 32, "batch_size": 8, "roi_size": 4, "hidden": 8, "epochs": 3, "workers": 0, "device": "cpu",
    "max_skip_fraction": 0.2,
}  # fmt: skip
STEPS = 9  # 3 epochs of 3 steps
NAN_AT = [1, 2]  # rank 1's loss at step 2 is NaN: every rank must skip that step
RAISE_AT = [1, 5]  # rank 1 raises while computing step 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list:
    """The data specs: synthetic samples and BAD unreadable npz files."""
    folder = tmp_path_factory.mktemp("npz")
    for i in range(BAD):
        (folder / f"bad{i}.npz").write_bytes(bytes(range(256)) * (i + 1))
    return [f"synthetic:,num_samples={SAMPLES - BAD},image_size=32", f"npz:{folder}"]


# imported once by the fork server (torch._dynamo: the optimizer imports it on first use)
PRELOAD = ["torch", "torch._dynamo", "pyfast.train", "ddp_worker"]


def _spawn(tmp_path: Path, name: str, data: list, faults: dict, resume: bool = False, **more) -> dict:
    """Two ranks of one run in RUN_DIR=tmp_path/name; returns each rank's record."""
    records = tmp_path / f"{name}-records-{'resume' if resume else 'start'}"
    records.mkdir()
    config = {**CONFIG, "data": data, "out": str(tmp_path / name), **more}
    start = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start == "forkserver":
        mp.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, on first use
    ranks = mp.start_processes(run_rank, args=(2, free_port(), config, str(records), faults, resume), nprocs=2,
                               start_method=start, join=False)
    deadline = time.monotonic() + RANK_TIMEOUT_S + 30  # the ranks' own limit first: their stacks are on stderr
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            hung = [rank for rank, process in enumerate(ranks.processes) if process.is_alive()]
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"run {name}: rank(s) {hung} still running after {RANK_TIMEOUT_S + 30} s: hung")
    return {rank: json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _losses(run: Path):
    return [(r["step"], r["loss"], r["parts"], r["lr"], r["grad_norm"], r["iou_refined"]) for r in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted 2-rank run of STEPS steps, with a NaN planted on rank 1 at step 2."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    return tmp_path / "full", _spawn(tmp_path, "full", data, {"nan": NAN_AT})


def test_sharding_meets_every_sample_once_with_the_same_steps_on_every_rank():
    for n in (1, 2, 5, 16, 33, 64, 101):
        for batch_size in (1, 3, 8):
            for world in (1, 2, 3, 8):
                order = epoch_order(list(range(100, 100 + n)), seed=4, epoch=7)
                shards = [rank_batches(order, batch_size, rank, world) for rank in range(world)]
                slots = micro_slots(n, batch_size, world)
                assert all(len(shard) == slots for shard in shards)  # DDP: the same number of steps everywhere
                met = [i for slot in range(slots) for shard in shards for i in shard[slot]]
                assert met == order  # every sample once, in the epoch's order: nothing repeated, nothing dropped
                for slot in range(slots):
                    sizes = [len(shard[slot]) for shard in shards]
                    assert max(sizes) - min(sizes) <= 1 and (max(sizes) == batch_size or slot == slots - 1)
                    weights = [slot_weight(n, slot, batch_size, rank, world) for rank in range(world)]
                    assert weights == pytest.approx([world * s / sum(sizes) for s in sizes])
                    assert sum(weights) == pytest.approx(world)  # DDP's mean over ranks: a mean over samples
    # one rank: the plain batches of the order; the order moves with the epoch and the seed only
    order = epoch_order(list(range(20)), seed=1, epoch=2)
    assert rank_batches(order, 8) == [order[:8], order[8:16], order[16:]]
    assert epoch_order(list(range(20)), 1, 2) == order != epoch_order(list(range(20)), 1, 3)


def test_the_world_comes_from_torchruns_environment(monkeypatch, tmp_path, capsys):
    assert World.from_env({}) == World()  # a plain process: rank 0 of 1, no process group
    one = World.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"})
    assert one.size == 1 and one.launched and not one.start().started  # --nproc-per-node 1: still no group
    two = World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (two.rank, two.size, two.local_rank, two.is_main) == (1, 2, 1, False)
    for env, words in [({"WORLD_SIZE": "2", "RANK": "0"}, "without LOCAL_RANK"),
                       ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 is outside WORLD_SIZE=2"),
                       ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer")]:
        with pytest.raises(DistributedError, match=words):
            World.from_env(env)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "MASTER_ADDR" in err and "torchrun" in err and err.count("\n") == 1


def test_two_ranks_train_one_run(reference):
    run, ranks = reference
    for rank in (0, 1):
        assert ranks[rank]["outcome"] == {"status": "completed", "steps": STEPS}
        # closing the world released DDP and destroyed the default group, though the run was still referenced
        assert ranks[rank]["released"] == {"ddp": True, "own_group": False, "groups": True}
    assert ranks[0]["params"] == ranks[1]["params"]  # the ranks never diverged, the skipped step included
    # each training sample met exactly once per epoch, across the ranks; rank 0's part of the last slot is empty
    epochs = []
    for epoch in range(3):
        met = [i for rank in (0, 1) for e, good, bad in ranks[rank]["seen"] if e == epoch for i in good + bad]
        assert len(met) == len(set(met)) == SAMPLES - 5
        epochs.append(set(met))
    assert epochs[0] == epochs[1] == epochs[2]  # the whole training set, every epoch
    assert [len(good + bad) for _, good, bad in ranks[0]["seen"]][:3] == [8, 8, 0]
    assert [len(good + bad) for _, good, bad in ranks[1]["seen"]][:3] == [8, 8, 1]
    # the unreadable files: met by both ranks over the epochs (and in validation), counted once, logged once
    met_bad = {rank: {i for _, _, bad in ranks[rank]["seen"] for i in bad} for rank in (0, 1)}
    assert met_bad[0] and met_bad[1]
    logged = read_jsonl(run / "skipped.jsonl")
    assert sorted(r["index"] for r in logged) == list(range(SAMPLES - BAD, SAMPLES))

    # one set of outputs, written by rank 0, with the totals of both ranks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and summary["steps_per_epoch"] == 3
    assert summary["backbone_samples"] == SAMPLES - BAD  # one shared cache: every sample computed once, by one rank
    assert summary["cache_hit_rate"] == 1.0 and summary["cache_lookups_warm"] == 2 * (SAMPLES - BAD)
    assert summary["skipped_samples"] == BAD
    assert summary["nonfinite_steps"] == 1 and summary["val_ap_refined"] is not None
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["skipped_step"] for r in records] == [False, True] + [False] * (STEPS - 2)
    assert records[1]["loss"] == "nan"
    assert all(r["cache_hit_rate"] == 1.0 for r in records[3:])  # every rank hits from epoch 2
    assert all(r["cache_hit_rate"] == 0.0 for r in records[:3])
    assert len(read_jsonl(run / "val.jsonl")) == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and checkpoint["progress"] == {"step": STEPS, "epoch": 3, "micro": 0}


def test_a_failing_rank_stops_every_rank_and_the_run_resumes_exactly(tmp_path, reference, data):
    full, _ = reference
    ranks = _spawn(tmp_path, "split", data, {"nan": NAN_AT, "raise": RAISE_AT})
    assert all(ranks[rank]["released"] == {"ddp": True, "own_group": False, "groups": True} for rank in (0, 1))
    assert ranks[1]["outcome"] == {"error": "RuntimeError", "message": "planted failure at step 5"}
    assert ranks[0]["outcome"]["error"] == "RankFailed"
    assert "rank 1 failed: RuntimeError: planted failure at step 5" in ranks[0]["outcome"]["message"]
    assert ranks[0]["params"] == ranks[1]["params"]
    split = tmp_path / "split"
    summary = json.loads((split / "summary.json").read_text())
    assert summary["status"] == "failed: RuntimeError on rank 1" and summary["steps"] == 4
    checkpoint = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["progress"] == {"step": 4, "epoch": 1, "micro": 1}  # the failed step is not taken

    resumed = _spawn(tmp_path, "split", data, {"nan": NAN_AT}, resume=True, max_steps=STEPS)
    assert resumed[0]["outcome"] == {"status": "completed", "steps": STEPS}
    assert _losses(split) == _losses(full)  # bit-identical to the uninterrupted run
    full_params = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    split_params = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(full_params[k], split_params[k]) for k in full_params)
    assert read_jsonl(split / "skipped.jsonl") == read_jsonl(full / "skipped.jsonl")  # counted once across the resume
    assert json.loads((split / "summary.json").read_text())["skipped_samples"] == BAD


def test_a_rank_that_cannot_start_stops_every_rank_before_anything_is_written(tmp_path, data):
    ranks = _spawn(tmp_path, "never", data, {"config": {"1": {"data": [f"npz:{tmp_path}/missing"]}}})
    assert ranks[1]["outcome"]["error"] == "DataError"
    assert ranks[0]["outcome"]["error"] == "RankFailed"
    assert ranks[0]["outcome"]["message"].startswith("rank 1 failed: DataError:")
    assert not (tmp_path / "never").exists()


def test_a_rank_that_stops_answering_fails_the_others_after_the_timeout(tmp_path, data):
    ranks = _spawn(tmp_path, "stall", data, {"stall": [1, 3, 4]}, dist_timeout=1)
    # the run's own group (--dist-timeout 1) and DDP over it are released even after a failed collective
    assert all(ranks[rank]["released"] == {"ddp": True, "own_group": True, "groups": True} for rank in (0, 1))
    assert ranks[0]["outcome"]["error"] == "DistributedError"
    assert "the gradient all-reduce failed" in ranks[0]["outcome"]["message"]
    assert "--dist-timeout 1 s" in ranks[0]["outcome"]["message"]
    assert ranks[1]["outcome"]["error"] == "DistributedError"  # it woke up to a closed connection
    summary = json.loads((tmp_path / "stall" / "summary.json").read_text())
    assert summary["status"] == "failed: DistributedError" and summary["steps"] == 2
    checkpoint = torch.load(tmp_path / "stall" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["progress"] == {"step": 2, "epoch": 0, "micro": 2}


def test_resume_under_another_world_size_is_refused_naming_both(reference, capsys):
    run, _ = reference
    before = (run / "config.yaml").read_text()
    assert main(["--resume", str(run), "--epochs", "4", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "world size 2" in err and "world size 1" in err and err.count("\n") == 1
    assert "schedule" not in out  # refused before anything else is said about the resume
    assert (run / "config.yaml").read_text() == before


def test_an_out_holding_a_run_and_a_damaged_checkpoint_are_refused_on_every_rank(tmp_path, reference, data):
    run = tmp_path / "copy"
    shutil.copytree(reference[0], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ranks = _spawn(tmp_path, "copy", data, {})  # a new run into a folder that holds one
    assert ranks[0]["outcome"]["error"] == "RunDirError" and "already holds a run" in ranks[0]["outcome"]["message"]
    assert ranks[1]["outcome"] == {"error": "RankFailed", "message": "rank 0 failed: RunDirError: "
                                   + ranks[0]["outcome"]["message"]}
    last = run / "checkpoints" / "last.pt"
    damaged = bytearray(before[last])
    damaged[len(damaged) // 2] ^= 0xFF
    last.write_bytes(bytes(damaged))
    before[last] = bytes(damaged)
    ranks = _spawn(tmp_path, "copy", data, {}, resume=True, max_steps=STEPS + 1)
    for rank in (0, 1):  # rank 0 read it and refused; the others got its error
        assert ranks[rank]["outcome"]["error"] == "CheckpointError"
        assert "last.pt is damaged: its checksum does not match" in ranks[rank]["outcome"]["message"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, data):
    run = tmp_path / "run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items() if k != "epochs"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "pyfast.cli.train", *[a for spec in data for a in ("--data", spec)], *args, "--epochs", "400",
           "--no-progress", "--out", str(run)]
    tree = str(Path(pyfast.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.time() + 120
        while len(read_jsonl(run / "metrics.jsonl")) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        workers = {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RANK" in p.environ()}
        assert sorted(workers) == [0, 1]
        workers[1].send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=RANK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung = sorted(rank for rank, p in workers.items() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
            pytest.fail(f"rank(s) {hung} still running {RANK_TIMEOUT_S} s after SIGTERM to rank 1: hung")
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode != 0  # torchrun reports the ranks' exit code 143 as a failure
    assert err.count("exitcode  : 143") == 2, err  # both ranks stopped by the agreed SIGTERM
    assert "stopped by SIGTERM; continue with: pyfast-train --resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted (SIGTERM)" and summary["world_size"] == 2
    steps = summary["steps"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, steps + 1))
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["progress"]["step"] == steps  # one checkpoint, at the step where every rank stopped
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_ranks_on_two_gpus_with_nccl(tmp_path, data):
    ranks = _spawn(tmp_path, "gpu", data, {}, device="auto")
    for rank in (0, 1):
        assert ranks[rank]["outcome"] == {"status": "completed", "steps": STEPS}
    assert ranks[0]["params"] == ranks[1]["params"]
    for epoch in range(3):
        met = [i for rank in (0, 1) for e, good, bad in ranks[rank]["seen"] if e == epoch for i in good + bad]
        assert len(met) == len(set(met)) == SAMPLES - 5
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["world_size"] == 2 and summary["precision"] in ("bf16", "fp16")
    assert summary["cache_hit_rate"] == 1.0 and summary["backbone_samples"] == SAMPLES - BAD
