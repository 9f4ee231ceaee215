"""`pyfast-doctor memory RUN_DIR`: the memory verdict and the top growers of a run.

Reads what the monitor wrote into the run directory (memory.jsonl, memory.json) and recomputes the
verdict from the samples, so a run that died (killed for memory, say) is judged on everything it
recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Tuple

from pyfast.memory.files import REPORT_FILE, SAMPLES_FILE, load_run
from pyfast.memory.report import format_verdict
from pyfast.memory.verdict import LeakRule, build_verdict

EXIT_OK, EXIT_LEAK, EXIT_USAGE = 0, 1, 2


def diagnose(run_dir) -> Tuple[dict, str]:
    """(verdict, text) of a run directory. Raises FileNotFoundError when it holds no memory record."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    samples, report = load_run(run_dir)
    if not samples and report is None:
        raise FileNotFoundError(f"{run_dir} has no {SAMPLES_FILE} or {REPORT_FILE}: the run recorded no memory samples")
    if samples:
        rule = LeakRule.from_dict(report["rule"]) if report else LeakRule()
        investigations = report.get("investigations", []) if report else []
        notes = report.get("notes", []) if report else []
        verdict = build_verdict(samples, rule, investigations, notes)
        if report is None:
            verdict["notes"].append(f"{REPORT_FILE} is missing: judged with the default rule, without growers")
    else:
        verdict = report["verdict"]
    header = f"{run_dir}: {len(samples):,} memory samples" + (
        f", steps {samples[0]['step']}-{samples[-1]['step']}" if samples else "")
    return verdict, header + "\n" + format_verdict(verdict)


def add_memory_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("memory", help="the memory verdict and top growers of a run directory")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=f"a run directory with {SAMPLES_FILE}")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON instead of text")
    return parser


def run_memory_command(args: argparse.Namespace) -> int:
    """Prints the report; exit 0 without a leak, 1 with one, 2 without memory files."""
    try:
        verdict, text = diagnose(args.run_dir)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
        print(f"pyfast-doctor: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(verdict, indent=1) if args.json else text)
    return EXIT_LEAK if verdict["leak"] else EXIT_OK
