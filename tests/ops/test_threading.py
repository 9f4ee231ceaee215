"""The CPU kernels' threads: torch's OpenMP runtime or pyfast's own pool, the same bits with any
thread count, no new threads per call, and forked children (DataLoader workers) that do not hang.

Each scenario runs in a fresh interpreter: the backend is chosen once per process
(PYFAST_CPU_PARALLEL), and a hang must fail the test, not the test session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfast
from pyfast import _native

pytestmark = pytest.mark.skipif(not _native.native_available("cpu"), reason="pyfast._C is not built")

# Where the pyfast under test was imported from (the source tree with a built module, or site-packages
# after an install): the child interpreters run there (`python -c` puts its folder first on sys.path)
# and import the same one.
PYFAST_HOME = os.path.dirname(os.path.dirname(os.path.abspath(pyfast.__file__)))
BACKENDS = ["auto", "pool"]
TORCH_USES_OPENMP = "OpenMP" in torch.__config__.parallel_info()

# Inputs big enough for 4 threads (the kernels keep >= 8 blocks of 2048 boxes per thread), made
# before any fork so that a child runs only pyfast's kernels: torch's own parallel ops (a clone of
# 100k elements) hang in a child forked after torch used libgomp's threads with more than one thread,
# which is why DataLoader workers run with one; that is torch's limit, not the subject here.
PRELUDE = """
import os, sys, threading, torch, pyfast
from pyfast import _C

def box_inputs(n=4 * 8 * 2048 + 1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 50 + 1
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(n, 4, generator=g) * 5
    return pred, target

def loss_and_grad(pred, target):
    p = pred.clone().requires_grad_()
    loss = pyfast.box_loss(p, target, mode="giou", reduction="mean")
    loss.backward()
    return loss.detach(), p.grad

def threads_named(name):
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == name
        except FileNotFoundError:
            pass
    return count

def thread_count():
    return len(os.listdir("/proc/self/task"))
"""


def run_script(body: str, backend: str, timeout: float = 120.0) -> str:
    """Runs PRELUDE + body in a fresh interpreter with PYFAST_CPU_PARALLEL=backend; returns stdout.
    A run past `timeout` (a hang) kills its whole process group, forked children included."""
    env = dict(os.environ, PYFAST_CPU_PARALLEL=backend, PYTHONPATH=PYFAST_HOME + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=PYFAST_HOME,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"hung for {timeout:.0f} s (PYFAST_CPU_PARALLEL={backend})")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def test_backend_follows_the_setting():
    out = run_script("print(_C.cpu_parallel_backend())", "pool")
    assert out.strip() == "pool"
    out = run_script("print(_C.cpu_parallel_backend())", "auto")
    if TORCH_USES_OPENMP:
        # torch's own runtime, found in the process (pyfast._C links none).
        assert out.startswith("openmp: ") and "omp" in out, out
    else:
        assert out.strip() in ("pool",) or out.startswith("openmp: "), out


def test_bad_setting_is_named():
    env = dict(os.environ, PYFAST_CPU_PARALLEL="threads", PYTHONPATH=PYFAST_HOME)
    code = PRELUDE + "loss_and_grad(*box_inputs())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=PYFAST_HOME)
    assert proc.returncode != 0
    assert "PYFAST_CPU_PARALLEL" in proc.stderr and "threads" in proc.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_bits_for_every_thread_count(backend):
    out = run_script(
        """
        pred, target = box_inputs()
        results = []
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            results.append(loss_and_grad(pred, target))
        loss1, grad1 = results[0]
        for loss, grad in results[1:]:
            assert torch.equal(loss, loss1), (loss, loss1)
            assert torch.equal(grad, grad1)
        mask = torch.rand(8, 128, 128, generator=torch.Generator().manual_seed(1)) * 8 - 4
        masks = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            masks.append(pyfast.mask_loss(mask, (mask > 0.5).to(torch.uint8), reduction="mean"))
        assert all(torch.equal(m, masks[0]) for m in masks), masks
        print("ok", float(loss1))
        """,
        backend,
    )
    assert out.startswith("ok")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_thread_per_call(backend):
    out = run_script(
        """
        pred, target = box_inputs()
        a = torch.randn(256, 256)
        torch.set_num_threads(4)
        loss_and_grad(pred, target)
        a @ a
        before = thread_count()
        for i in range(60):
            torch.set_num_threads(2 + i % 3)
            loss_and_grad(pred, target)
            a @ a
        after = thread_count()
        assert after == before, (before, after)
        own = threads_named("pyfast-cpu")
        print(own)
        """,
        backend,
    )
    own = int(out.split()[-1])
    if backend == "pool":
        assert own == 3  # a team of 4: the caller and three parked workers, started once
    elif TORCH_USES_OPENMP:
        assert own == 0  # torch's workers ran the blocks


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_calls_from_python_threads(backend):
    # One call at a time uses the threads; a call meanwhile from another thread still gets the
    # same result (its blocks run on its own thread, or the runtime nests).
    out = run_script(
        """
        pred, target = box_inputs()
        torch.set_num_threads(2)
        expected = loss_and_grad(pred, target)
        failures = []
        def worker():
            for _ in range(10):
                loss, grad = loss_and_grad(pred, target)
                if not (torch.equal(loss, expected[0]) and torch.equal(grad, expected[1])):
                    failures.append(1)
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
        print("failures", len(failures))
        """,
        backend,
    )
    assert out.split()[-1] == "0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_forked_child_after_a_call_does_not_hang(backend):
    out = run_script(
        """
        pred, target = box_inputs()
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        a @ a
        expected = loss_and_grad(pred, target)   # the parent's threads are up and warm
        p = pred.clone().requires_grad_()  # the child runs no torch op of its own that would thread
        want_loss, want_grad = expected[0].item(), expected[1].numpy()
        pid = os.fork()
        if pid == 0:
            # More than one thread in the child on purpose: the hard case.
            loss = pyfast.box_loss(p, target, mode="giou", reduction="mean")
            loss.backward()
            ok = loss.item() == want_loss and (p.grad.numpy() == want_grad).all()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("forked child ok", _C.cpu_parallel_backend().split(":")[0])
        """,
        backend,
    )
    assert "forked child ok" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_dataloader_workers_forked_after_a_call(backend):
    out = run_script(
        """
        import multiprocessing
        from torch.utils.data import DataLoader, Dataset
        pred, target = box_inputs()
        torch.set_num_threads(2)
        expected = loss_and_grad(pred, target)

        class Losses(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return pyfast.box_loss(pred, target, mode="giou", reduction="mean")

        loader = DataLoader(Losses(), batch_size=2, num_workers=2,
                            multiprocessing_context=multiprocessing.get_context("fork"))
        values = torch.cat([batch for batch in loader])
        assert torch.equal(values, expected[0].expand(4)), (values, expected[0])
        print("loader ok")
        """,
        backend,
    )
    assert "loader ok" in out
