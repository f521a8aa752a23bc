"""``LinearOperator.astype``: the same matrix in another dtype, its structure kept; and
``pivot_precision``, the dtype whose ``eps`` the pivot tests use."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    LowRank,
    ScaledIdentity,
    SymmetricBlockTridiagonal,
    Zero,
    pivot_tolerance,
)
from tallskinny.linalg.factor import pivot_precision
from tallskinny.linalg.kronecker import Kronecker, Permutation, Product


def _operators():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    S = r(3, 3)
    return [
        Dense(r(3, 4)),
        Dense(S + S.mT, symmetric=True),
        Zero(2, 3),
        ScaledIdentity(3, 2.5),
        Diagonal(r(4)),
        LowRank(r(4, 2), r(2, 2)),
        Kronecker(ScaledIdentity(2), r(3, 2)),
        Permutation(torch.tensor([2, 0, 1])),
        Product(Permutation(torch.tensor([1, 0, 2])), Dense(r(3, 3))),
        BlockDiagonal([Dense(r(2, 2)), Diagonal(r(3))]),
        SymmetricBlockTridiagonal([Dense(S + S.mT), Dense(S + S.mT)], [Dense(r(3, 3))]),
    ]


@pytest.mark.parametrize("op", _operators(), ids=lambda op: type(op).__name__)
def test_astype_keeps_matrix_and_structure(op):
    low = op.astype(torch.float32)
    assert type(low) is type(op)
    assert low.dtype == torch.float32 and low.shape == op.shape and low.symmetric == op.symmetric
    assert torch.allclose(low.to_dense(), op.to_dense().to(torch.float32), rtol=1e-6, atol=1e-6)  # (products round)
    assert op.astype(op.dtype) is op
    x = torch.randn(op.shape[1], 2, dtype=torch.float32)
    assert torch.allclose(low @ x, op.to_dense().to(torch.float32) @ x, atol=1e-5)


def test_pivot_precision_is_scoped():
    f32 = pivot_tolerance(10, torch.float32, 1.0)
    with pivot_precision(torch.float64):
        assert pivot_tolerance(10, torch.float32, 1.0) == pivot_tolerance(10, torch.float64, 1.0) < f32
    assert pivot_tolerance(10, torch.float32, 1.0) == f32
