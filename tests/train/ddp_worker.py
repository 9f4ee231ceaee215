"""One rank of a small distributed run, started by `torch.multiprocessing.spawn` from the tests.

Each rank writes what it saw to RECORD_DIR/rank<R>.json: the global indices of the samples of every
training step it took part in (by epoch; skipped samples included), how its run ended, and a
digest of its parameters at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import torch


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
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"seen": seen, "outcome": outcome, "params": digest.hexdigest()}, handle)
