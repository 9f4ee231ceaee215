"""The command-line tools in a child process, as a user runs them, interrupted at a chosen moment."""

from __future__ import annotations

import subprocess
import time


def interrupt_when(cmd, ready, sig, *, cwd, env=None, timeout_s: float = 120.0) -> tuple[int, str, str]:
    """Starts `cmd` in `cwd`, waits until `ready()` holds (failing the test if the process ends
    first, or after timeout_s), sends it `sig` and returns (returncode, stdout, stderr). The process
    is killed if anything on the way fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        deadline = time.time() + timeout_s
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err
