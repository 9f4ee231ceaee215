"""Verdicts in words: one-line growth descriptions, the doctor's report, a compact summary."""

from __future__ import annotations

from typing import List, Optional

from pyfast.memory.verdict import INFORMATIVE, LEAK, WATCHED

LABELS = {
    "host": "host memory",
    "workers": "DataLoader workers' memory",
    "cuda": "CUDA allocated memory",
    "fds": "open file descriptors",
}
HINTS = {
    "workers": "worker memory that grows is usually copy-on-write of Python objects the workers share "
               "with the main process (lists or dicts of samples in the dataset: keep them in numpy "
               "arrays), or a per-worker cache without a bound",
    "fds": "files, sockets or pipes opened and never closed",
}


def _unit(assessment: dict) -> str:
    return "MB" if assessment.get("unit", "MB") == "MB" else "descriptors"


def _mb(nbytes: float) -> str:
    if abs(nbytes) < 2**20:
        return f"{nbytes / 2**10:,.1f} KB"
    return f"{nbytes / 2**20:,.1f} MB"


def _short_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def describe_growth(name: str, assessment: dict) -> str:
    """'host memory (anon_mb) grows 52.1 MB per 1000 steps (95% CI 50.3 to 53.8; ...) over steps a-b'."""
    ci = assessment["ci"]
    steps = assessment["steps"]
    return (f"{LABELS.get(name, name)} ({assessment['field']}) grows {assessment['slope']:.1f} {_unit(assessment)} "
            f"per 1000 steps (95% CI {ci[0]:.1f} to {ci[1]:.1f}; {assessment['positive_fraction']:.0%} of pairwise "
            f"slopes above 0) over steps {steps[0]}-{steps[1]} ({assessment['samples']} samples)")


def _retains_text(entry: dict, limit: int = 5) -> str:
    kinds = entry.get("retains") or []
    # Classes say more than the dicts and lists they are made of: name them first.
    ordered = [k for k in kinds if "." in k["type"]] + [k for k in kinds if "." not in k["type"]]
    return ", ".join(f"{_short_type(k['type'])} x{k['count']:,}" for k in ordered[:limit])


def holder_line(entry: dict) -> str:
    new = ", ".join(f"+{count:,} {kind}" for kind, count in entry["new"].items())
    size = f", {entry['holder_len']:,} entries" if entry.get("holder_len") is not None else ""
    if entry.get("len_delta"):
        size += f" ({entry['len_delta']:+,} in the window)"
    line = (f"{entry['holder']} ({_short_type(entry['holder_type'])}{size}): {new}, retaining "
            f"{entry['retained_objects']:,} new objects, {_mb(entry['retained_bytes'])}: {_retains_text(entry)}")
    if entry.get("allocated_at"):
        line += f"; allocated at {entry['allocated_at']}"
    return line


def grower_lines(growers: dict, indent: str = "  ") -> List[str]:
    lines = [f"what grows (object census over steps {growers['steps'][0]}-{growers['steps'][1]}: "
             f"{growers['new_objects']:,} new objects, {_mb(growers['new_bytes'])} host"
             f"{', with tracemalloc' if growers.get('tracemalloc') else ''}):"]
    for entry in growers.get("held_by", [])[:3]:
        lines.append(f"{indent}held by {holder_line(entry)}")
    if growers.get("by_count"):
        lines.append(f"{indent}top growers by count: " + ", ".join(
            f"{g['type']} +{g['count_delta']:,}" for g in growers["by_count"][:6]))
    if growers.get("by_bytes"):
        lines.append(f"{indent}top growers by bytes: " + ", ".join(
            f"{g['type']} +{_mb(g['bytes_delta'])}" for g in growers["by_bytes"][:6]))
    devices = {d: b for d, b in (growers.get("tensor_bytes_delta") or {}).items() if d != "cpu" and b}
    for device, nbytes in devices.items():
        lines.append(f"{indent}{device} tensors: {'+' if nbytes > 0 else ''}{_mb(nbytes)}")
    if growers.get("sites"):
        lines.append(f"{indent}allocation sites of memory still held (tracemalloc): " + "; ".join(
            f"{s['site']} {_mb(s['bytes'])} in {s['blocks']:,} blocks" for s in growers["sites"][:4]))
    return lines


def _row(name: str, assessment: dict) -> str:
    label = f"{name} ({assessment['field']})" if name in WATCHED else assessment["field"]
    if "slope" not in assessment:
        return (f"  {label:<28} {'-':>14}   {'-':<26} {assessment['status']} "
                f"({assessment['samples']} samples after warm-up)")
    ci = assessment["ci"]
    interval = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
    status = f"{assessment['status']}  bound {assessment['bound']:g}" if name in WATCHED else "(for information)"
    return f"  {label:<28} {assessment['slope']:>+14.2f}   {interval:<26} {status}"


def format_verdict(verdict: dict) -> str:
    """The verdict as the doctor prints it."""
    series = verdict.get("series") or {}
    status = verdict["status"]
    lines = []
    if verdict["leak"]:
        lines.append(f"memory: LEAK - {describe_growth(verdict['leaking'][0], series[verdict['leaking'][0]])}")
    elif status == "growing":
        growing = [n for n in WATCHED if series.get(n, {}).get("status") == "growing"]
        lines.append(f"memory: growing, not (yet) sustained - {describe_growth(growing[0], series[growing[0]])}")
    elif status == "ok":
        lines.append("memory: OK - no sustained growth after warm-up")
    else:
        lines.append(f"memory: not enough samples to judge ({verdict['samples']} taken; the rule needs "
                     f"{verdict['rule']['min_samples']} after {verdict['rule']['warmup_steps']} warm-up steps)")
    if series:
        lines.append(f"  {'series':<28} {'per 1000 steps':>14}   {'95% CI':<26} status")
        for name in list(WATCHED) + list(INFORMATIVE):
            if name in series:
                lines.append(_row(name, series[name]))
    for name in verdict.get("leaking", [])[1:]:
        lines.append(f"also: {describe_growth(name, series[name])}")
    cuda, reserved = series.get("cuda"), series.get("cuda_reserved_mb")
    if (cuda and cuda["status"] != LEAK and reserved and reserved.get("slope") is not None
            and reserved["slope"] >= verdict["rule"]["cuda_mb"] and reserved["ci"][0] > 0):
        lines.append("note: CUDA reserved memory grows while allocated memory does not: the caching allocator "
                     "keeps freed blocks (fragmentation), not live tensors")
    for name in verdict.get("leaking", []):
        if name in HINTS:
            lines.append(f"hint: {HINTS[name]}")
    growers = verdict.get("growers")
    if growers:
        lines.extend(grower_lines(growers))
        host = series.get("host")
        if "host" in verdict.get("leaking", []) and host:
            window = (growers["steps"][1] - growers["steps"][0]) * host["slope"] / 1000.0 * 2**20
            if growers["new_bytes"] < 0.25 * window:
                lines.append("  Python objects account for little of the growth: look at native memory "
                             "(C/C++ allocations, allocator caches, memory-mapped files)")
    elif verdict["leak"] and set(verdict["leaking"]) & {"host", "cuda"}:
        lines.append("what grows: not searched (investigate=False, or the search limit was reached)")
    for note in verdict.get("notes", []):
        lines.append(f"note: {note}")
    rule = verdict["rule"]
    lines.append(f"rule: a leak is a Theil-Sen slope >= the bound (MB or descriptors per 1000 steps) with its "
                 f"{rule['confidence']:.0%} CI above 0, sustained (each half of the window >= bound/2 with its CI "
                 f"above 0, the halves within a factor 2), over the last {rule['window']} samples "
                 f"(>= {rule['min_samples']} samples, >= {rule['min_steps']} steps) after {rule['warmup_steps']} "
                 f"warm-up steps")
    return "\n".join(lines)


def summarize(verdict: dict) -> dict:
    """Slopes per 1000 steps, status and the top grower, for a run's summary.json."""
    series = verdict.get("series") or {}
    out = {"status": verdict["status"], "leak": verdict["leak"], "leaking": list(verdict.get("leaking", []))}
    for name in WATCHED:
        assessment = series.get(name)
        key = f"{name}_per_1000_steps" if name == "fds" else f"{name}_mb_per_1000_steps"
        out[key] = assessment.get("slope") if assessment else None
    growers = verdict.get("growers")
    top: Optional[str] = None
    if growers and growers.get("held_by"):
        entry = growers["held_by"][0]
        top = f"{entry['holder']} holds " + ", ".join(f"{c:,} {k}" for k, c in entry["new"].items())
    out["top_grower"] = top
    out["message"] = format_verdict(verdict).splitlines()[0]
    return out
