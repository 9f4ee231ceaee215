import json
import subprocess
import sys

import pytest

from pyfast.cli.doctor import main

from .builders import NPZ_BAD, NPZ_GOOD


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
