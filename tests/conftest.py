"""Fixtures shared by the test folders."""

import os

import pytest
import torch


@pytest.fixture
def float64():
    """float64 as torch's default dtype for the test (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def suite_threads() -> int:
    """Torch threads of the suite: ``TALLSKINNY_TEST_THREADS`` (default 1). One is fastest
    for the small dense references and does not stall a shared machine; more run the
    BLAS on other code paths (blocked, threaded reductions), whose rounding differs — the
    suite must pass either way."""
    value = os.environ.get("TALLSKINNY_TEST_THREADS", "1")
    try:
        threads = int(value)
    except ValueError:
        raise pytest.UsageError(f"TALLSKINNY_TEST_THREADS must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise pytest.UsageError(f"TALLSKINNY_TEST_THREADS must be a positive integer, got {value!r}")
    return threads


@pytest.fixture(autouse=True, scope="session")
def _test_threads():
    """The suite's torch threads (see :func:`suite_threads`), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(suite_threads())
    yield
    torch.set_num_threads(threads)
