import json
import subprocess
import sys

import pytest

from pyfast.cli.doctor import main

from .builders import NPZ_BAD, NPZ_FINDINGS, NPZ_GOOD, make_coco_findings_set, make_npz_findings_set

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_reports_skips_grouped_by_reason_and_fails_over_the_bound(npz_set, tmp_path, capsys):
    root, expected_bad = npz_set
    out = tmp_path / "report"
    code = main(["data", "--data", f"npz:{root}", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1  # 16 of 24 bad: far over 5%
    assert f"npz ({root}): 24" in text
    assert f"ok: {len(NPZ_GOOD)}" in text and f"skipped: {len(NPZ_BAD)}" in text
    assert "       4  unreadable file" in text and "       3  inconsistent paired fields" in text
    assert "bad/missing_boxes.npz" in text and "FAIL" in text
    lines = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {line["file"]: line["category"] for line in lines} == expected_bad


def test_passes_within_the_bound(npz_set, capsys):
    root, expected_bad = npz_set
    fraction = len(expected_bad) / (len(expected_bad) + len(NPZ_GOOD) + 300)
    code = main(["data", "--data", f"npz:{root}", "--data", "synthetic:,num_samples=300,image_size=32",
                 "--max-skip-fraction", f"{fraction + 1e-6}", "--workers", "2"])
    assert code == 0
    assert "OK" in capsys.readouterr().out
    assert main(["data", "--data", f"npz:{root}", "--data", "synthetic:,num_samples=300,image_size=32",
                 "--max-skip-fraction", f"{fraction - 1e-3}"]) == 1


def test_optional_missing_source_is_skipped(tmp_path, capsys):
    code = main(["data", "--data", "synthetic:,num_samples=4,image_size=32", "--data", f"npz:{tmp_path / 'gone'},optional=1"])
    out = capsys.readouterr().out
    assert code == 0 and "missing, skipped" in out and "ok: 4" in out


def test_required_missing_source_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "gone"
    assert main(["data", "--data", f"npz:{missing}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "optional=1" in err


def test_console_entry_point_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "gone"
    result = subprocess.run([sys.executable, "-m", "pyfast.cli.doctor", "data", "--data", f"npz:{missing}"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"pyfast-doctor: error: npz source path '{missing}' does not exist "
        f"(add optional=1 to --data npz:{missing} to skip it when missing)"]
    assert "Traceback" not in result.stderr


def test_bad_spec_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as error:
        main(["data", "--data", "lmdb:/x"])
    assert error.value.code == 2 and "unknown source kind 'lmdb'" in capsys.readouterr().err


def test_warnings_alone_keep_exit_0_and_are_listed_by_kind(tmp_path, capsys):
    root = make_npz_findings_set(tmp_path / "npz")
    for name in ("absurd.npz", "absurd_prompt.npz"):
        (root / name).unlink()
    out = tmp_path / "report"
    assert main(["data", "--data", f"npz:{root}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table_at, findings_at = text.index(f"npz ({root}): 7"), text.index("findings: 6 warnings")
    assert table_at < findings_at < text.index("OK: within the --max-skip-fraction bound")
    for file, found in NPZ_FINDINGS.items():
        for kind, obj in found:
            assert f"       1  warning: {kind}\n" in text
            where = file if obj is None else f"{file} object {obj}"
            assert f"npz ({root}): {where}: " in text
    records = [json.loads(line) for line in (out / "findings.jsonl").read_text().splitlines()]
    assert {(r["file"], r["kind"], r["object"]) for r in records} == {
        (file, kind, obj) for file, found in NPZ_FINDINGS.items() for kind, obj in found}
    assert all(r["severity"] == "warning" and r["source"] == f"npz ({root})" and r["detail"] for r in records)


def test_findings_and_skips_are_reported_together_and_only_the_bound_fails(tmp_path, capsys):
    root = make_npz_findings_set(tmp_path / "npz")  # 2 of 9 samples have boxes at 1e30
    assert main(["data", "--data", f"npz:{root}", "--max-skip-fraction", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "       2  boxes out of range" in text and "findings: 6 warnings" in text
    assert main(["data", "--data", f"npz:{root}"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_only_a_few_examples_per_kind_and_the_rest_counted(tmp_path, capsys):
    root = make_npz_findings_set(tmp_path / "npz")
    for n in range(5):
        (root / f"more/empty_{n}.npz").parent.mkdir(exist_ok=True)
        (root / f"more/empty_{n}.npz").write_bytes((root / "empty_mask.npz").read_bytes())
    assert main(["data", "--data", f"npz:{root}", "--max-skip-fraction", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "       6  warning: empty mask" in text and "... and 3 more" in text
    assert "       6  warning: duplicate sample" in text  # the copy of clean.npz and the 5 above


def test_coco_entries_dropped_are_in_the_start_up_line_and_the_findings(tmp_path, capsys):
    ann_file, images_dir = make_coco_findings_set(tmp_path / "coco")
    out = tmp_path / "report"
    code = main(["data", "--data", f"coco:{ann_file},images={images_dir}", "--out", str(out), "--workers", "2"])
    text = capsys.readouterr().out
    assert code == 1  # 8 of 12 images skipped
    label = f"coco ({ann_file})"
    first = text.splitlines()[0]
    assert first.startswith(f"warning: {label}: 3 dropped (") and "pyfast-doctor data lists them" in first
    assert "       1  dropped: annotation without category_id" in text
    assert f"{label}: kept.png annotation 102: no category_id; not used" in text
    assert f"{label}: degenerate_part.png object 0 annotation 201: polygon part 1 has 4 numbers" in text
    records = [json.loads(line) for line in (out / "findings.jsonl").read_text().splitlines()]
    assert sorted(r["severity"] for r in records) == ["dropped"] * 3 + ["warning"] * 3


def test_workers_find_the_same(tmp_path, capsys):
    root = make_npz_findings_set(tmp_path / "npz")
    reports = []
    for workers in ("0", "2"):
        out = tmp_path / f"report{workers}"
        main(["data", "--data", f"npz:{root}", "--out", str(out), "--workers", workers])
        reports.append(sorted((out / "findings.jsonl").read_text().splitlines()))
    capsys.readouterr()
    assert reports[0] == reports[1] and len(reports[0]) == 6
