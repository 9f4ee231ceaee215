"""pyfast-train: train box and mask refinement heads on frozen backbone features.

Argument parsing and printing only; the work is `pyfast.train.prepare` and `pyfast.train.train`.
Settings layer as defaults < --fast < --config FILE.yaml < flags; `--resume` starts from the
run's checkpoint and accepts only the changes that keep its continuation exact. A mistake is one
line on stderr (`pyfast-train: error: ...`): exit 2 before training starts, 1 when training fails
or diverges, 3 when memory grew past --max-memory-growth (checkpoint saved), 130 for Ctrl-C,
128 + N when signal N stopped the run (it resumes).

Under torchrun (`torchrun --nproc-per-node N $(which pyfast-train) ...`) every process runs this
with the same arguments; rank 0 prints the table and the errors every rank shares, another rank
prints only an error of its own that the others could not be told about (a lost connection).
Every rank exits with the same code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "pyfast-train"


def build_parser() -> argparse.ArgumentParser:
    from pyfast.cli.options import add_config_flags
    from pyfast.train.config import flag_name
    from pyfast.train.setup import RESUME_RESCHEDULES, RESUME_SAFE

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train box and mask refinement heads on cached features of a frozen backbone. "
        "With no arguments: the embedded synthetic data set and a small seeded backbone.",
        epilog="Every option is also a key of --config files and of a run's config.yaml.",
    )
    allowed = [flag_name(n) for n in RESUME_SAFE + RESUME_RESCHEDULES if n not in ("out", "fast")]
    parser.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                        help="continue a run from its last checkpoint (RUN_DIR, or the --out folder); only "
                        f"{', '.join(allowed[:-1])} and {allowed[-1]} may change")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(parser)
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = None
    try:
        args = build_parser().parse_args(argv)
        return _main(args, started)
    except KeyboardInterrupt:  # while the run is being built: training handles its own Ctrl-C
        left = "the run is as it was" if args is not None and args.resume else "nothing was written"
        return _fail(f"interrupted before training started; {left}", 130)


def _main(args: argparse.Namespace, started: float) -> int:
    from pyfast.cli.options import config_layers
    from pyfast.train import ConfigError, World
    from pyfast.train.config import default_of
    from pyfast.train.distributed import DistributedError

    try:
        layers = config_layers(args)
        world = World.from_env()
        # the process group's timeout until the run's own setting is known (on --resume, from its checkpoint)
        world.start(next((layer["dist_timeout"] for layer in reversed(layers) if "dist_timeout" in layer),
                         default_of("dist_timeout")))
    except (ConfigError, DistributedError) as error:
        return _fail(str(error))
    try:
        return _train(args, layers, world, started)
    finally:
        world.close()


def _train(args: argparse.Namespace, layers: list, world, started: float) -> int:
    from pyfast.data import MissingSourceError, TooManyBadSamples
    from pyfast.models import BackboneError
    from pyfast.models.weights import WeightsError
    from pyfast.train import (
        CheckpointError, ConfigError, FeatureError, RankFailed, RunDirError, TrainingDiverged, build_config,
        format_table, plan_resume, prepare, train,
    )  # fmt: skip
    from pyfast.train.distributed import DistributedError, agreed
    from pyfast.train.loop import exit_code
    from pyfast.train.memory import STOPPED_BY
    from pyfast.train.setup import DataError

    def fail(error: BaseException, code: int) -> int:
        if world.is_main or not agreed(error):  # rank 0 speaks for every rank; others only of what it cannot know
            prefix = "" if world.size == 1 or agreed(error) else f"rank {world.rank}: "
            _fail(prefix + str(error), code)
        return code

    def refuse(message: str) -> int:  # a mistake in the arguments, which every rank shares
        return _fail(message) if world.is_main else 2

    try:
        if args.resume:
            out = layers[-1].get("out")
            run_dir = args.resume if isinstance(args.resume, str) else out
            if not run_dir:
                return refuse("--resume needs a run directory: --resume RUN_DIR (or --out RUN_DIR --resume)")
            if out is not None and isinstance(args.resume, str) and os.path.abspath(out) != os.path.abspath(args.resume):
                return refuse(f"--resume {args.resume} and --out {out} name different run directories")
            # rank 0 reads the checkpoint; every rank continues from that one copy
            config, checkpoint = world.on_main(lambda: plan_resume(run_dir, layers, world_size=world.size))
            run = prepare(config, resume=checkpoint, world=world)
        else:
            run = prepare(build_config(*layers), world=world)
    except (ConfigError, RunDirError, DataError, MissingSourceError, BackboneError, WeightsError, CheckpointError,
            FeatureError, RankFailed, DistributedError) as error:
        return fail(error, 2)

    try:
        summary = train(run, progress_bar=False if args.no_progress else None, started=started)
    except KeyboardInterrupt:
        return _fail(f"interrupted; run directory {run.paths.path} (continue with: {PROG} --resume {run.paths.path})", 130)
    except (TrainingDiverged, TooManyBadSamples, CheckpointError, FeatureError, OSError, RankFailed,
            DistributedError) as error:
        if world.is_main:
            print(format_table(_read_summary(run)))
        return fail(error, 1)
    if not world.is_main:
        return 1 if summary["status"] == "diverged" else exit_code(summary)
    print(format_table(summary))
    if summary["status"] == "diverged":
        return _fail(f"the model diverged: {summary['val_nonfinite_boxes']} validation boxes are non-finite "
                     f"({summary['nonfinite_steps']} of {summary['steps']} steps were skipped); try a lower --lr", 1)
    code = exit_code(summary)
    if summary["stopped_by"] == STOPPED_BY:
        return _fail(f"memory growth stopped the run at step {summary['steps']}: {summary['memory']['stopped']} "
                     f"(--max-memory-growth); checkpoints/last.pt is saved; what grows: pyfast-doctor memory "
                     f"{run.paths.path}", code)
    if code:
        print(f"{PROG}: stopped by {summary['stopped_by']}; continue with: {PROG} --resume {run.paths.path}", file=sys.stderr)
    return code


def _read_summary(run) -> dict:
    import json

    try:
        return json.loads(run.paths.summary.read_text())
    except (OSError, ValueError):
        return {"status": "failed", "run_dir": str(run.paths.path)}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
