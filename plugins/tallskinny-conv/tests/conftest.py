import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """The tests run in float64 unless they say otherwise, on one thread (or
    ``TALLSKINNY_TEST_THREADS``, as the main suite): the matrices are small, and
    multithreaded LAPACK on a busy 2-core machine can take seconds for a 400 × 400
    eigvalsh. Both are restored afterwards."""
    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(int(os.environ.get("TALLSKINNY_TEST_THREADS", "1")))
    yield
    torch.set_default_dtype(previous)
    torch.set_num_threads(threads)
