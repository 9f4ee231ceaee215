"""One rank of a small distributed run, started by `torch.multiprocessing.spawn` from the tests.

Each rank writes what it saw to RECORD_DIR/rank<R>.json: the global indices of the samples of every
training step it took part in (by epoch; skipped samples included), how its run ended, a digest of
its parameters at the end, and what closing the world released.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import socket
import time
import weakref

import torch
import torch.distributed as dist

# A rank still running after this long is hung (a run here takes seconds): it prints every thread's
# stack to stderr and exits with an error, so the test fails saying where instead of blocking.
RANK_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hook(faults: dict, rank: int):
    """loss_hook from a picklable description: {"nan": [rank, step], "raise": [rank, step],
    "stall": [rank, step, seconds]}."""
    def hook(step, loss):
        if faults.get("stall", [None, None])[:2] == [rank, step]:
            time.sleep(faults["stall"][2])  # a rank that stops answering for a while
        if faults.get("nan") == [rank, step]:
            return loss * float("nan")
        if faults.get("raise") == [rank, step]:
            raise RuntimeError(f"planted failure at step {step}")
        return loss

    return hook


def run_rank(rank: int, size: int, port: int, config: dict, record_dir: str, faults: dict, resume: bool) -> None:
    """faults: {"nan": [rank, step], "raise": [rank, step]} planted in the loss; {"config": {rank: {...}}}:
    settings of one rank only (a rank that cannot start)."""
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    config = {**config, **faults.get("config", {}).get(str(rank), {})}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import pyfast.train.loop as loop
    from pyfast.train import World, build_config, plan_resume, prepare, train

    seen = []
    real_step = loop.train_step

    def recording_step(run, batches, epoch, *args, **kwargs):
        good = [i for b in batches for i in b.indices.tolist()]
        skipped = [record.index for b in batches for record in b.skipped]
        seen.append([epoch, good, skipped])
        return real_step(run, batches, epoch, *args, **kwargs)

    loop.train_step = recording_step
    outcome = {}
    with World.from_env() as world:
        try:
            if resume:
                cfg, checkpoint = world.on_main(lambda: plan_resume(config["out"], [{"max_steps": config["max_steps"]}],
                                                                   log=lambda *a: None))
                run = prepare(cfg, resume=checkpoint, world=world, log=lambda *a: None)
            else:
                run = prepare(build_config(config), world=world, log=lambda *a: None)
            summary = train(run, loss_hook=_hook(faults, rank), progress_bar=False)
            outcome = {"status": summary["status"], "steps": summary["steps"]}
        except Exception as error:
            outcome = {"error": type(error).__name__, "message": str(error)}
        digest = hashlib.sha256()
        if "run" in locals():
            for tensor in run.model.state_dict().values():
                digest.update(tensor.cpu().numpy().tobytes())
        wrapper = weakref.ref(world.ddp) if world.ddp is not None else None
        own_group = world.group is not None  # --dist-timeout other than the start's: set_timeout made one
    # closed while `run` is still referenced here: DDP's wrapper (and its reducer's hold on the
    # groups) must be gone all the same, and every group destroyed
    released = {"ddp": wrapper is not None and wrapper() is None, "own_group": own_group,
                "groups": not dist.is_initialized()}
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"seen": seen, "outcome": outcome, "params": digest.hexdigest(), "released": released}, handle)
