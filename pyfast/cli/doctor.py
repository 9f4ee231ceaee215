"""`pyfast-doctor`: checks that find problems before a training run does.

`pyfast-doctor data --data SPEC [...]` loads and validates every sample of the sources without
training and reports what would be skipped, and why.
`pyfast-doctor memory RUN_DIR` prints the memory verdict and top growers of a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from torch.utils.data import DataLoader
from tqdm import tqdm

from pyfast.data import (
    MissingSourceError,
    RobustDataset,
    SkippedSample,
    SkipTracker,
    add_data_arguments,
    build_sources,
    data_specs_from_args,
)
from pyfast.data.skip import exceeds_bound
from pyfast.memory.doctor import add_memory_command, run_memory_command

EXIT_OK, EXIT_TOO_MANY_BAD, EXIT_USAGE = 0, 1, 2
_EXAMPLES_PER_REASON = 3
_SCAN_BATCH = 32


def _scan_batch(items) -> Tuple[int, List[SkippedSample]]:
    # Only the verdicts travel back from the workers, not the decoded images.
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    return len(items) - len(skipped), skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyfast-doctor", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser("data", help="scan every sample of the data sources without training")
    add_data_arguments(data)
    data.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/skipped.jsonl")
    data.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader workers for the scan (default 0)")
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
        sources = build_sources(data_specs_from_args(args), log=print)
    except (MissingSourceError, ValueError, OSError) as error:
        return _error(str(error))

    dataset = RobustDataset(sources)
    total = len(dataset)
    if total == 0:
        print("no samples to scan: every source is empty or missing", file=sys.stderr)
        return EXIT_TOO_MANY_BAD

    log_path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        log_path = args.out / "skipped.jsonl"
        log_path.write_text("")  # a fresh scan, not an append to an older one
    # The doctor reports every bad sample instead of stopping at the bound: max_fraction=1.
    tracker = SkipTracker(total, max_fraction=1.0, log_path=log_path)
    loader = DataLoader(dataset, batch_size=_SCAN_BATCH, num_workers=args.workers, collate_fn=_scan_batch)

    started = time.perf_counter()
    ok = 0
    skipped: List[SkippedSample] = []
    with tqdm(total=total, unit="sample", disable=not sys.stderr.isatty(), file=sys.stderr) as progress:
        for good, bad in loader:
            ok += good
            skipped.extend(bad)
            tracker.record(bad)
            progress.update(good + len(bad))
    elapsed = time.perf_counter() - started

    print(f"scanned {total:,} samples in {elapsed:.1f} s ({total / max(elapsed, 1e-9):,.0f} samples/s)")
    print(f"ok: {ok:,}")
    print(f"skipped: {tracker.count:,} ({tracker.fraction:.2%} of the samples, allowed {args.max_skip_fraction:.2%})")
    if skipped:
        print(format_skip_report(skipped))
    if log_path is not None:
        print(f"skipped samples written to {log_path}")
    if exceeds_bound(tracker.count, total, args.max_skip_fraction):
        print(
            f"FAIL: {tracker.fraction:.2%} of the samples are bad, more than --max-skip-fraction "
            f"{args.max_skip_fraction:g}; training would abort"
        )
        return EXIT_TOO_MANY_BAD
    print("OK: within the --max-skip-fraction bound")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data":
        return run_data(args)
    if args.command == "memory":
        return run_memory_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse restricts the choices


if __name__ == "__main__":
    sys.exit(main())
