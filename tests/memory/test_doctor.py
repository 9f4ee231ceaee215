"""pyfast-doctor memory RUN_DIR: exit codes, the report, a run that died before memory.json."""

import json
import subprocess
import sys

import numpy as np

from pyfast.cli.doctor import main
from pyfast.memory import LeakRule
from pyfast.memory.files import REPORT_FILE, SAMPLES_FILE, write_report, write_samples

RULE = LeakRule()


def write_run(run_dir, slope_mb_per_step, steps=2000, every=10, report=True):
    """A run directory as the monitor leaves it, from a synthetic series."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = [{"step": s, "segment": 0, "rss_mb": 900.0 + slope_mb_per_step * s + rng.normal(0, 0.5),
                "anon_mb": 800.0 + slope_mb_per_step * s + rng.normal(0, 0.5), "fds": 12}
               for s in range(every, steps + 1, every)]
    write_samples(run_dir / SAMPLES_FILE, samples)
    if report:
        write_report(run_dir / REPORT_FILE, {"version": 1, "every": every, "rule": RULE.as_dict(),
                                             "notes": ["USS is unavailable (AccessDenied): reporting RSS only"],
                                             "investigations": [], "verdict": {}})
    return samples


def test_a_leaking_run_exits_1_with_the_slope(tmp_path, capsys):
    write_run(tmp_path / "run", 0.05)  # 50 MB per 1000 steps
    assert main(["memory", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "LEAK - host memory (anon_mb) grows 50.0 MB per 1000 steps" in out
    assert "200 memory samples, steps 10-2000" in out
    assert "USS is unavailable" in out  # notes recorded by the run are shown
    assert "what grows: not searched" in out


def test_a_clean_run_exits_0(tmp_path, capsys):
    write_run(tmp_path / "run", 0.0)
    assert main(["memory", str(tmp_path / "run")]) == 0
    assert "memory: OK - no sustained growth after warm-up" in capsys.readouterr().out


def test_json_output(tmp_path, capsys):
    write_run(tmp_path / "run", 0.05)
    assert main(["memory", str(tmp_path / "run"), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["leak"] and verdict["leaking"] == ["host"] and verdict["series"]["host"]["slope"] > 45


def test_a_run_that_died_before_its_report_is_judged_with_the_default_rule(tmp_path, capsys):
    samples = write_run(tmp_path / "run", 0.05, report=False)
    with open(tmp_path / "run" / SAMPLES_FILE, "a") as handle:
        handle.write('{"step": 2010, "segm')  # the line the kill cut short
    assert main(["memory", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert f"{len(samples)} memory samples" in out and "judged with the default rule" in out


def test_missing_run_or_memory_files_exit_2(tmp_path, capsys):
    assert main(["memory", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["memory", str(tmp_path / "empty")]) == 2
    assert "recorded no memory samples" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / REPORT_FILE).write_text('{"version": 99}')
    assert main(["memory", str(tmp_path / "bad")]) == 2
    assert "format version" in capsys.readouterr().err


def test_console_entry_point(tmp_path):
    write_run(tmp_path / "run", 0.05)
    result = subprocess.run([sys.executable, "-m", "pyfast.cli.doctor", "memory", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "LEAK" in result.stdout and "Traceback" not in result.stderr
