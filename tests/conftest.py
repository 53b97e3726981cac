"""Shared test setup."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine its
    spin-waiting barriers made some files 10-15x slower.  Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
