"""pyfast-train: train box and mask refinement heads on frozen backbone features.

Argument parsing only; the work is pyfast.train.Trainer. Settings layer as
defaults < --fast < --config FILE.yaml < flags; `--resume` starts from the run's saved config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pyfast.data import MissingSourceError, TooManyBadSamples, add_data_arguments

PROG = "pyfast-train"

# flag -> config field, for the flags that map one to one
_FLAGS = {
    "epochs": int, "max_steps": int, "batch_size": int, "lr": float, "precision": str, "accumulate": int,
    "clip_norm": float, "device": str, "seed": int, "cache_dir": str, "workers": int, "out": str,
    "backbone": str, "image_size": int, "checkpoint_every": int,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train box and mask refinement heads on cached features of a frozen backbone. "
        "With no arguments: the embedded synthetic data set and a small seeded backbone.",
    )
    parser.add_argument("--fast", action="store_true", help="the quick preset: small images, short schedule, cache on")
    parser.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (keys as in config.yaml)")
    parser.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                        help="continue a run from its last checkpoint (RUN_DIR or --out)")
    s = argparse.SUPPRESS
    parser.add_argument("--epochs", type=int, default=s, metavar="N")
    parser.add_argument("--max-steps", type=int, default=s, metavar="N",
                        help="stop after N optimizer steps in all, counted across resumes")
    parser.add_argument("--batch-size", type=int, default=s, metavar="B")
    parser.add_argument("--lr", type=float, default=s)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=s,
                        help="auto: bf16 (fp16 + GradScaler on older GPUs) on CUDA, fp32 on CPU")
    parser.add_argument("--accumulate", type=int, default=s, metavar="N", help="micro-batches per optimizer step")
    parser.add_argument("--clip-norm", type=float, default=s, metavar="X", help="gradient norm bound (<= 0: off)")
    parser.add_argument("--device", default=s, help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=s)
    parser.add_argument("--image-size", type=int, default=s, metavar="S")
    parser.add_argument("--cache-dir", default=s, metavar="DIR", help="feature cache folder (default RUN_DIR/cache; off: none)")
    parser.add_argument("--workers", type=int, default=s, help="DataLoader workers (default 0 on CPU, 2 on CUDA)")
    parser.add_argument("--out", default=s, metavar="RUN_DIR", help="run directory (default runs/train-DATE-TIME)")
    parser.add_argument("--backbone", default=s, metavar="MODULE:CALLABLE",
                        help="a frozen feature extractor returning a (B, C, h, w) map (default: a seeded conv stack)")
    parser.add_argument("--checkpoint-every", type=int, default=s, metavar="N", help="also save 'last' every N steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace, argv: list[str]):
    from pyfast.train.config import FAST, build_config, load_yaml

    flags = {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}
    if args.data:
        flags["data"] = [spec.text for spec in args.data]
    if any(a == "--max-skip-fraction" or a.startswith("--max-skip-fraction=") for a in argv):
        flags["max_skip_fraction"] = args.max_skip_fraction
    if args.resume:
        run_dir = args.resume if isinstance(args.resume, str) else flags.get("out")
        if not run_dir:
            raise ValueError("--resume needs a run directory: --resume RUN_DIR or --out RUN_DIR --resume")
        saved = Path(run_dir) / "config.yaml"
        if not saved.exists():
            raise ValueError(f"--resume: {saved} does not exist")
        flags["out"] = str(run_dir)
        return build_config(load_yaml(saved), flags)
    layers = []
    if args.fast:
        layers.append(FAST)
    if args.config:
        layers.append(load_yaml(args.config))
    layers.append(flags)
    return build_config(*layers)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    from pyfast.models import BackboneError
    from pyfast.train import CheckpointError, ConfigError, Trainer, TrainingDiverged, format_table

    def fail(message: str, code: int = 2) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    try:
        config = config_from_args(args, argv)
        trainer = Trainer(config, resume=bool(args.resume), progress=False if args.no_progress else None)
    except (ConfigError, MissingSourceError, BackboneError, CheckpointError, FileNotFoundError, ValueError) as error:
        return fail(str(error))

    try:
        summary = trainer.run()
    except (TrainingDiverged, TooManyBadSamples, CheckpointError) as error:
        print(format_table(trainer.summary(f"failed: {type(error).__name__}")))
        return fail(str(error), 1)
    except KeyboardInterrupt:
        return fail(f"interrupted; run directory {trainer.run_dir} (resume with --out {trainer.run_dir} --resume)", 130)
    print(format_table(summary))
    if trainer.stop_code:
        print(f"{PROG}: stopped by signal; resume with: {PROG} --out {trainer.run_dir} --resume", file=sys.stderr)
        return trainer.stop_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
