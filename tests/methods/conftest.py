import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _float64(float64):
    """The methods' tests run in float64 unless they say otherwise."""
    yield
