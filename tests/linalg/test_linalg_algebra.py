"""Block structure is kept by sums, products, scalings and transposes where it exists."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg import (
    BlockDiagonal,
    BlockLowerBidiagonal,
    BlockTridiagonal,
    BlockUpperBidiagonal,
    Dense,
    Diagonal,
    Identity,
    ScaledIdentity,
    SymmetricBlockTridiagonal,
    Zero,
)
from tallskinny.linalg.testing import (
    random_block_tridiagonal,
    random_matrix,
    random_symmetric_block_tridiagonal,
)




F64 = torch.float64
SIZES = [2, 3, 1, 4]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def blocks(rows, cols, seed):
    g = gen(seed)
    return [torch.randn(r, c, generator=g, dtype=F64) for r, c in zip(rows, cols)]


def lower_bi(seed):
    g = gen(seed)
    return BlockLowerBidiagonal(
        [random_matrix(b, b, g) for b in SIZES],
        [torch.randn(SIZES[i + 1], SIZES[i], generator=g, dtype=F64) for i in range(3)],
    )


def upper_bi(seed):
    g = gen(seed)
    return BlockUpperBidiagonal(
        [random_matrix(b, b, g) for b in SIZES],
        [torch.randn(SIZES[i], SIZES[i + 1], generator=g, dtype=F64) for i in range(3)],
    )


def block_diag(seed):
    return BlockDiagonal(blocks(SIZES, SIZES, seed))


def tri(seed):
    return random_block_tridiagonal(SIZES, gen(seed))


def sym(seed):
    return random_symmetric_block_tridiagonal(SIZES, gen(seed))


def same(op, dense, tol=1e-13):
    assert torch.allclose(op.to_dense(), dense, rtol=tol, atol=tol * max(1.0, dense.abs().max().item()))


PRODUCTS = [
    (block_diag, block_diag, BlockDiagonal),
    (lower_bi, block_diag, BlockLowerBidiagonal),
    (block_diag, upper_bi, BlockUpperBidiagonal),
    (lower_bi, upper_bi, BlockTridiagonal),
    (upper_bi, lower_bi, BlockTridiagonal),
    (block_diag, tri, BlockTridiagonal),
    (sym, block_diag, BlockTridiagonal),
    (lower_bi, lower_bi, Dense),  # two sub-diagonals: no block structure left
    (tri, tri, Dense),
    (sym, upper_bi, Dense),
]


@pytest.mark.parametrize("left, right, expected", PRODUCTS, ids=lambda x: getattr(x, "__name__", ""))
def test_products_keep_structure(left, right, expected):
    a, b = left(1), right(2)
    product = a @ b
    assert type(product) is expected
    same(product, a.to_dense() @ b.to_dense())


SUMS = [
    (lower_bi, upper_bi, BlockTridiagonal),
    (block_diag, lower_bi, BlockLowerBidiagonal),
    (sym, sym, SymmetricBlockTridiagonal),
    (sym, tri, BlockTridiagonal),
    (sym, lower_bi, BlockTridiagonal),
    (tri, upper_bi, BlockTridiagonal),
]


@pytest.mark.parametrize("left, right, expected", SUMS, ids=lambda x: getattr(x, "__name__", ""))
def test_sums_keep_structure(left, right, expected):
    a, b = left(3), right(4)
    for total, dense in ((a + b, a.to_dense() + b.to_dense()), (a - b, a.to_dense() - b.to_dense())):
        assert type(total) is expected
        same(total, dense)


def test_transposes():
    lo, up, t, s = lower_bi(0), upper_bi(0), tri(0), sym(0)
    assert type(lo.T) is BlockUpperBidiagonal and type(up.T) is BlockLowerBidiagonal
    assert type(t.T) is BlockTridiagonal and s.T is s
    for op in (lo, up, t, s, block_diag(0)):
        same(op.T, op.to_dense().T)
    rect = BlockDiagonal(blocks([2, 3], [4, 1], 5))
    assert type(rect.T) is BlockDiagonal and rect.T.shape == (5, 5) and rect.shape == (5, 5)
    same(rect.T, rect.to_dense().T)


def test_damping_a_symmetric_matrix_keeps_it_symmetric_block_tridiagonal():
    s = sym(1)
    eps = 0.3
    for damped in (s + eps * Identity(s.shape[0]), ScaledIdentity(s.shape[0], eps) + s):
        assert type(damped) is SymmetricBlockTridiagonal
        same(damped, s.to_dense() + eps * torch.eye(s.shape[0], dtype=F64))
        assert damped.factorize().inertia().positive >= s.factorize().inertia().positive
    d = torch.linspace(1, 2, s.shape[0], dtype=F64)
    for damped in (s + Diagonal(d), Diagonal(d) + s):
        assert type(damped) is SymmetricBlockTridiagonal
        same(damped, s.to_dense() + torch.diag(d))


def test_diagonal_products_keep_structure():
    t = tri(2)
    d = torch.linspace(-1, 2, t.shape[0], dtype=F64)
    for product, dense in ((Diagonal(d) @ t, torch.diag(d) @ t.to_dense()), (t @ Diagonal(d), t.to_dense() @ torch.diag(d))):
        assert type(product) is BlockTridiagonal
        same(product, dense)
    scaled = t @ ScaledIdentity(t.shape[0], 2.0)
    assert type(scaled) is BlockTridiagonal
    same(scaled, 2 * t.to_dense())
    assert (t @ Identity(t.shape[0])) is t


def test_nested_blocks_keep_their_own_structure():
    a = BlockDiagonal([Diagonal(torch.tensor([1.0, 2.0], dtype=F64)), Diagonal(torch.tensor([3.0], dtype=F64))])
    product = a @ a
    assert type(product) is BlockDiagonal
    assert all(type(b) is Diagonal for b in product.diagonal)
    same(product, torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=F64)))
    total = a + a
    assert all(type(b) is Diagonal for b in total.diagonal)


def test_rectangular_block_diagonal_products():
    a = BlockDiagonal(blocks([2, 3], [4, 1], 1))
    b = BlockDiagonal(blocks([4, 1], [3, 2], 2))
    product = a @ b
    assert type(product) is BlockDiagonal and product.shape == (5, 5)
    same(product, a.to_dense() @ b.to_dense())


def test_mismatched_partitions_fall_back_to_dense():
    a = block_diag(0)
    b = BlockDiagonal(blocks([3, 2, 1, 4], [3, 2, 1, 4], 1))
    assert a.shape == b.shape and a.row_sizes != b.row_sizes
    for result, dense in ((a @ b, a.to_dense() @ b.to_dense()), (a + b, a.to_dense() + b.to_dense())):
        assert type(result) is Dense
        same(result, dense)


def test_zero_operands():
    t = tri(0)
    n = t.shape[0]
    assert t + Zero(n, n) is t
    assert type(t @ Zero(n, 2)) is Zero and (t @ Zero(n, 2)).shape == (n, 2)
    assert type(Zero(3, n) @ t) is Zero
    same(t - t, torch.zeros(n, n, dtype=F64))


def test_scalar_multiples_keep_symmetry():
    s = sym(0)
    for r in (2.0 * s, s * -1.5, -s, s - 0.25 * s):
        assert type(r) is SymmetricBlockTridiagonal and r.symmetric
    same(-s, -s.to_dense())
    # a symmetric result still factors symmetrically: inertia of -S mirrors that of S
    pos, neg, _ = s.factorize().inertia()
    assert tuple((-s).factorize().inertia()) == (neg, pos, 0)


def test_incompatible_operands_raise():
    t = tri(0)
    with pytest.raises(TypeError, match="dtype"):
        t + Dense(torch.zeros(t.shape, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        t @ Dense(torch.zeros(t.shape[0] + 1, 2, dtype=F64))
    with pytest.raises(TypeError):
        t * torch.ones(2)
