import json

import pytest

from pyfast.data import Finding, FindingsReport
from pyfast.data.findings import SEVERITY, summarize


def finding(kind, n, **where):
    return Finding(kind, "npz (/d)", f"f{n}.npz", f"detail {n}", **where)


def test_report_counts_by_kind_keeps_the_first_few_and_logs_every_one(tmp_path):
    log = tmp_path / "out" / "findings.jsonl"
    log.parent.mkdir()
    log.write_text("stale\n")
    report = FindingsReport(examples=2, log_path=log)
    report.add([finding("empty mask", n, object=n) for n in range(5)])
    report.add([finding("annotation of an unknown image", 9, annotation=17)])
    report.add([])
    assert report.count() == 6 and report.count("warning") == 5 and report.count("dropped") == 1
    assert [f.file for f in report.examples_of("empty mask")] == ["f0.npz", "f1.npz"]
    assert report.summary() == "1 dropped (1 annotation of an unknown image); 5 warnings (5 empty mask)"
    assert report.format().splitlines() == [
        "findings: 1 dropped (1 annotation of an unknown image); 5 warnings (5 empty mask)",
        "       1  dropped: annotation of an unknown image",
        "            npz (/d): f9.npz annotation 17: detail 9",
        "       5  warning: empty mask",
        "            npz (/d): f0.npz object 0: detail 0",
        "            npz (/d): f1.npz object 1: detail 1",
        "            ... and 3 more",
    ]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [Finding.from_record(r) for r in records] == [finding("empty mask", n, object=n) for n in range(5)] + [
        finding("annotation of an unknown image", 9, annotation=17)]
    assert records[0]["severity"] == "warning" and records[-1]["severity"] == "dropped"


def test_empty_report_and_one_warning():
    assert FindingsReport().format() == "findings: none"
    assert summarize([finding("zero-area box", 0)]) == "1 warning (1 zero-area box)"


def test_every_kind_has_a_severity_and_unknown_kinds_are_refused():
    assert set(SEVERITY.values()) == {"warning", "dropped"}
    with pytest.raises(ValueError, match="unknown finding kind"):
        Finding("something", "s", "f", "d")
