"""``linalg.lu``: solves through the row-major LU factor equal ``lu_solve`` and dense
solves to rounding, on both sides of ``ROW_MAJOR_MIN``, for matrices and vectors."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg.lu import ROW_MAJOR_MIN, LUFactors, in_layout_of, pivots_to_permutation


def matrix(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=dtype) + n**0.5 * torch.eye(n, dtype=dtype)


@pytest.mark.parametrize("n", [1, 5, ROW_MAJOR_MIN - 1, ROW_MAJOR_MIN, 200])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("columns", [3, 256])
def test_solve_matches_dense(n, dtype, rtol, columns):
    A = matrix(n, dtype)
    lu, piv = torch.linalg.lu_factor(A)
    factors = LUFactors(lu, piv)
    assert factors.row_major_pays(columns) == (n >= ROW_MAJOR_MIN and columns == 256)
    B = torch.randn(n, columns, generator=torch.Generator().manual_seed(1), dtype=dtype)
    X = factors.solve(B)
    ref = torch.linalg.solve(A.double(), B.double())
    assert X.shape == B.shape and X.dtype == dtype
    assert float((X.double() - ref).norm() / ref.norm()) <= rtol
    x = factors.solve(B[:, 0])
    assert x.shape == (n,)
    assert float((x.double() - ref[:, 0]).norm() / ref[:, 0].norm()) <= rtol


def test_permutation_is_the_row_order_of_the_pivots():
    A = matrix(150, torch.float64, seed=3)
    lu, piv = torch.linalg.lu_factor(A)
    P, L, U = torch.lu_unpack(lu, piv)  # A = P L U
    order = pivots_to_permutation(piv)
    assert torch.equal(torch.sort(order).values, torch.arange(150))
    assert torch.allclose(A[order], L @ U, rtol=0, atol=1e-12 * float(A.abs().max()))
    assert torch.equal(P.mT @ A, A[order])


def test_small_and_batched_factors_use_lu_solve():
    lu, piv = torch.linalg.lu_factor(torch.stack([matrix(130, torch.float64, s) for s in range(2)]))
    factors = LUFactors(lu, piv)  # batched: lu_solve as is
    B = torch.randn(2, 130, 2, dtype=torch.float64)
    assert torch.equal(factors.solve(B), torch.linalg.lu_solve(lu, piv, B))
    small = LUFactors(*torch.linalg.lu_factor(matrix(ROW_MAJOR_MIN - 1, torch.float64)))
    B = torch.randn(ROW_MAJOR_MIN - 1, 2, dtype=torch.float64)
    assert torch.equal(small.solve(B), torch.linalg.lu_solve(small.lu, small.pivots, B))


def test_gradients_and_batched_right_hand_sides_go_through_lu_solve():
    """``out=`` triangular solves are not differentiable and index the first dimension:
    a factor that autograd records, and a batched ``B`` on a 2-D factor, take ``lu_solve``."""
    n = ROW_MAJOR_MIN
    A = matrix(n, torch.float64).requires_grad_()
    lu, piv = torch.linalg.lu_factor(A)
    B = torch.randn(n, n, dtype=torch.float64)
    X = LUFactors(lu, piv).solve(B)
    X.sum().backward()
    ref = torch.linalg.solve(A.detach(), B)
    assert torch.allclose(X.detach(), ref, rtol=1e-10, atol=0) and A.grad is not None
    lu, piv = lu.detach(), piv
    batched = torch.randn(3, n, n, dtype=torch.float64)
    assert torch.allclose(LUFactors(lu, piv).solve(batched), torch.linalg.lu_solve(lu, piv, batched), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n,columns", [(5, 3), (ROW_MAJOR_MIN - 1, 7), (ROW_MAJOR_MIN, 7), (200, 2)])
def test_thin_answers_keep_the_layout_of_the_right_hand_side(n, columns):
    """``lu_solve`` leaves its answer column-major; products whose operands are both
    column-major take a slow GEMM path (``in_layout_of``), so a row-major ``B`` of several
    columns gets a row-major answer; a column-major ``B`` and a vector are left as they are."""
    factors = LUFactors(*torch.linalg.lu_factor(matrix(n, torch.float64)))
    B = torch.randn(n, columns, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert not factors.row_major_pays(columns)
    X = factors.solve(B)
    assert X.is_contiguous()
    assert torch.equal(X, torch.linalg.lu_solve(factors.lu, factors.pivots, B))
    Bc = B.mT.contiguous().mT  # column-major
    assert not factors.solve(Bc).is_contiguous()
    assert torch.equal(factors.solve(Bc), X)


def test_in_layout_of():
    X = torch.randn(3, 4).mT  # column-major 4 × 3
    assert in_layout_of(X, torch.randn(4, 3)).is_contiguous()
    assert in_layout_of(X, torch.randn(3, 4).mT) is X
    one = X[:, :1]  # one column: either layout, left as it is
    assert in_layout_of(one, torch.randn(4, 1)) is one
    x = torch.randn(4)
    assert in_layout_of(x, torch.randn(4)) is x
