"""`pyfast-doctor`: checks that find problems before a training run does.

`pyfast-doctor data [--data SPEC ...] [--fast] [--config FILE]` loads and validates every sample of
the sources without training and reports what would be skipped, and why, then what trains but looks
wrong (findings). It takes pyfast-train's own data options (same flags, defaults, `--fast` preset and
`--config` files), so with no `--data` it scans exactly what `pyfast-train` with the same options
would train on. `pyfast-doctor checkpoint PATH [--model SPEC]` describes a weights file or reports
how it loads into a model (`pyfast.models.weights_doctor`). `pyfast-doctor memory RUN_DIR` prints the
memory verdict and the top growers of a run (`pyfast.memory.doctor`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import DataLoader
from tqdm import tqdm

from pyfast.cli.options import add_config_flags, config_layers
from pyfast.data import FindingsReport, MissingSourceError, RobustDataset, SkippedSample, SkipTracker, build_sources
from pyfast.data.inspection import InspectingDataset, ScanTally, collect_verdicts
from pyfast.data.skip import exceeds_bound
from pyfast.models.weights_doctor import add_checkpoint_command, run_checkpoint
from pyfast.memory.doctor import add_memory_command, run_memory_command
from pyfast.train.config import ConfigError, build_config

# pyfast-train's options that decide what data it trains on.
DATA_OPTIONS = ("data", "synthetic_samples", "data_seed", "image_size", "max_skip_fraction")

EXIT_OK, EXIT_TOO_MANY_BAD, EXIT_USAGE = 0, 1, 2
_EXAMPLES_PER_REASON = 3
_SCAN_BATCH = 32


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyfast-doctor", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser(
        "data", help="scan every sample of the data sources without training",
        description="Scan every sample that pyfast-train with the same options would train on.",
    )
    add_config_flags(data, DATA_OPTIONS)
    data.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/skipped.jsonl and DIR/findings.jsonl")
    data.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader workers for the scan (default 0)")
    add_checkpoint_command(commands)
    add_memory_command(commands)
    return parser


def _error(message: str) -> int:
    print(f"pyfast-doctor: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def format_skip_report(skipped: Sequence[SkippedSample]) -> str:
    """Skipped samples grouped by reason category, most frequent first, with the first few files."""
    groups = defaultdict(list)
    for record in skipped:
        groups[record.category or record.reason].append(record)
    lines = ["skipped by reason:"]
    for category, records in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append(f"  {len(records):>6,}  {category}")
        for record in records[:_EXAMPLES_PER_REASON]:
            lines.append(f"            {record.source}: {record.file}: {record.reason}")
        if len(records) > _EXAMPLES_PER_REASON:
            lines.append(f"            ... and {len(records) - _EXAMPLES_PER_REASON:,} more")
    return "\n".join(lines)


def run_data(args: argparse.Namespace) -> int:
    if args.workers < 0:
        return _error(f"--workers must be >= 0, got {args.workers}")
    try:
        config = build_config(*config_layers(args))
        sources = build_sources(config.data_specs(), log=print)
    except (ConfigError, MissingSourceError, ValueError, OSError) as error:
        return _error(str(error))
    max_skip_fraction = config.max_skip_fraction

    dataset = RobustDataset(sources)
    total = len(dataset)
    if total == 0:
        print("no samples to scan: every source is empty or missing", file=sys.stderr)
        return EXIT_TOO_MANY_BAD

    log_path = findings_path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        log_path, findings_path = args.out / "skipped.jsonl", args.out / "findings.jsonl"
        log_path.write_text("")  # a fresh scan, not an append to an older one
    # The doctor reports every bad sample instead of stopping at the bound: max_fraction=1.
    tracker = SkipTracker(total, max_fraction=1.0, log_path=log_path)
    tally = ScanTally(sources, FindingsReport(log_path=findings_path))
    # Workers inspect the samples; only verdicts travel back, not the decoded images.
    loader = DataLoader(InspectingDataset(dataset), batch_size=_SCAN_BATCH, num_workers=args.workers,
                        collate_fn=collect_verdicts)

    started = time.perf_counter()
    with tqdm(total=total, unit="sample", disable=not sys.stderr.isatty(), file=sys.stderr) as progress:
        for verdicts in loader:
            tracker.record(tally.add(verdicts))
            progress.update(len(verdicts))
    elapsed = time.perf_counter() - started
    ok, skipped = tally.ok, tally.skipped

    print(f"scanned {total:,} samples in {elapsed:.1f} s ({total / max(elapsed, 1e-9):,.0f} samples/s)")
    print(f"ok: {ok:,}")
    print(f"skipped: {tracker.count:,} ({tracker.fraction:.2%} of the samples, allowed {max_skip_fraction:.2%})")
    if skipped:
        print(format_skip_report(skipped))
    print(tally.findings.format())
    if log_path is not None:
        print(f"skipped samples written to {log_path}, findings to {findings_path}")
    if exceeds_bound(tracker.count, total, max_skip_fraction):
        print(
            f"FAIL: {tracker.fraction:.2%} of the samples are bad, more than --max-skip-fraction "
            f"{max_skip_fraction:g}; training would abort"
        )
        return EXIT_TOO_MANY_BAD
    print("OK: within the --max-skip-fraction bound")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data":
        return run_data(args)
    if args.command == "checkpoint":
        return run_checkpoint(args)
    if args.command == "memory":
        return run_memory_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse restricts the choices


if __name__ == "__main__":
    sys.exit(main())
