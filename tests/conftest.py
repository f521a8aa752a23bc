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
