import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The planted-leak loops are tiny: on a shared 2-core machine, intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
