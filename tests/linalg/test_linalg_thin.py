"""``linalg.thin``: products with a thin block equal the plain ones to rounding; the wide
form is taken where the rule says (two or more columns, at most ``n/8`` of them, ``n`` at
least ``WIDE_MIN``), and its answer is column-major."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg.thin import WIDE_MIN, thin_addmm, thin_product


def operands(rows, cols, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=dtype), torch.randn(cols, k, generator=g, dtype=dtype)


@pytest.mark.parametrize(
    "rows,cols,k,wide",
    [
        (WIDE_MIN, WIDE_MIN, 7, True),
        (300, 520, 32, True),
        (WIDE_MIN, WIDE_MIN, WIDE_MIN // 8, True),
        (WIDE_MIN, WIDE_MIN, WIDE_MIN // 8 + 1, False),  # a square-ish product: plain
        (WIDE_MIN - 1, 600, 7, False),  # small: plain
        (600, 600, 1, False),  # one column: plain
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_products_equal_the_plain_ones(rows, cols, k, wide, dtype):
    M, X = operands(rows, cols, k, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    out = thin_product(M, X)
    torch.testing.assert_close(out, M @ X, **tol)
    assert out.shape == (rows, k)
    # the wide answer is the transpose of a row-major k × rows matrix
    assert (out.mT.is_contiguous() and not out.is_contiguous()) == (wide and rows > 1)
    T = torch.randn(rows, k, generator=torch.Generator().manual_seed(5), dtype=dtype)
    torch.testing.assert_close(thin_addmm(T, M, X, alpha=-0.5, beta=2.0), torch.addmm(T, M, X, alpha=-0.5, beta=2.0), **tol)
    # transposed operands (as the sweeps pass Q_ζyᵀ)
    Mt = M.mT.contiguous().mT
    torch.testing.assert_close(thin_product(Mt, X), M @ X, **tol)
