"""Fixtures shared by the test folders."""

import pytest
import torch


@pytest.fixture
def float64():
    """float64 as torch's default dtype for the test (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread for the whole suite: the references are small dense problems,
    fastest so, and a shared or busy machine does not stall on oversubscribed threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
