"""The training job flushes float32 subnormals only while it trains: the caller's setting comes back."""

import torch

from pyfast.train.loop import denormals_flushed


def _flushing() -> bool:
    return (torch.full((1,), 1e-39) * 0.5).item() == 0.0


def test_flush_is_on_inside_and_restored_after():
    torch.set_flush_denormal(False)
    with denormals_flushed(torch.device("cpu")):
        assert _flushing()
    assert not _flushing()


def test_a_caller_that_flushes_keeps_flushing():
    torch.set_flush_denormal(True)
    try:
        with denormals_flushed(torch.device("cpu")):
            assert _flushing()
        assert _flushing()
    finally:
        torch.set_flush_denormal(False)


def test_restored_when_the_run_raises():
    torch.set_flush_denormal(False)
    try:
        with denormals_flushed(torch.device("cpu")):
            raise RuntimeError("diverged")
    except RuntimeError:
        pass
    assert not _flushing()
