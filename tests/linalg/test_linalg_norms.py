"""``max_abs``: the scale of the pivot tests (``tallskinny.linalg.norms``)."""

import math

import pytest
import torch

from tallskinny.linalg.norms import max_abs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 3), (128, 128), (3, 4, 6)])
def test_max_abs_is_the_inf_norm_of_the_entries(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    for y in (x, -x, x.abs(), -x.abs(), x.mT if x.dim() > 1 else x):
        got = max_abs(y)
        assert got.dim() == 0 and got.dtype == dtype
        assert float(got) == float(y.abs().max()) == float(torch.linalg.vector_norm(y, float("inf")))


def test_max_abs_takes_the_most_negative_entry_where_it_dominates():
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]], dtype=torch.float64)
    assert float(max_abs(x)) == 3.0
    assert float(max_abs(torch.tensor([-0.0, -1e-300], dtype=torch.float64))) == 1e-300


def test_max_abs_propagates_nan_and_inf():
    x = torch.tensor([1.0, float("nan"), -2.0])
    assert math.isnan(float(max_abs(x)))
    assert float(max_abs(torch.tensor([1.0, -float("inf")]))) == math.inf
    assert float(max_abs(torch.tensor([float("inf"), 0.0]))) == math.inf
