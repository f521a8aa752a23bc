"""Every operator type runs the shared suite of :mod:`tallskinny.linalg.testing`.

Each class builds its operators *and* an independent dense reference (assembled here
from the blocks), so ``to_dense`` itself is checked too.
"""

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
    LowRank,
    ScaledIdentity,
    SymmetricBlockTridiagonal,
    Zero,
)
from tallskinny.linalg.testing import (
    LinearOperatorTestCase,
    random_matrix,
    random_sizes,
    random_symmetric,
)




def assemble(row_sizes, col_sizes, blocks):
    """Dense matrix from ``{(i, j): tensor}``."""
    ro = [0]
    for s in row_sizes:
        ro.append(ro[-1] + s)
    co = [0]
    for s in col_sizes:
        co.append(co[-1] + s)
    out = torch.zeros(ro[-1], co[-1], dtype=torch.float64)
    for (i, j), b in blocks.items():
        out[ro[i] : ro[i + 1], co[j] : co[j + 1]] = b.double()
    return out


def signs(n, gen):
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()


def nested_square_block(b, gen, dtype, kind, symmetric=False):
    """A b×b well-conditioned block of several operator kinds, and its dense value."""
    if kind == 0:
        m = random_symmetric(b, gen, dtype, eigenvalues=(2.0, 3.0)) if symmetric else random_matrix(b, b, gen, dtype, singular_values=(2.0, 3.0))
        return Dense(m, symmetric=symmetric), m
    if kind == 1:
        d = ((2 + torch.rand(b, generator=gen, dtype=torch.float64)) * signs(b, gen)).to(dtype)
        return Diagonal(d), torch.diag(d)
    if kind == 2:
        s = 2.5 * signs(1, gen).item()
        return ScaledIdentity(b, s, dtype=dtype), s * torch.eye(b, dtype=dtype)
    # a block-diagonal operator nested inside
    if b == 1:
        return nested_square_block(b, gen, dtype, 0, symmetric)
    k = b // 2
    parts = [random_symmetric(s, gen, dtype, eigenvalues=(2.0, 3.0)) for s in (k, b - k)]
    op = BlockDiagonal([Dense(p, symmetric=True) for p in parts])
    return op, torch.block_diag(*parts)


# ---------------------------------------------------------------------------------------
class TestDense(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        m = random_matrix(n, n, gen, dtype)
        return Dense(m), m


class TestDenseSymmetric(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        m = random_symmetric(n, gen, dtype)
        return Dense(m, symmetric=True), m


class TestDenseRectangular(LinearOperatorTestCase):
    square = False

    def make_operator(self, dtype, gen):
        m, n = torch.randint(1, 7, (2,), generator=gen).tolist()
        if m == n:
            n += 1
        a = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
        return Dense(a), a


class TestLowRank(LinearOperatorTestCase):
    """``U M Uᵀ`` of rank ``k < n`` (singular: no solves)."""

    singular = True
    structure_preserved = False

    def make_operator(self, dtype, gen):
        n = int(torch.randint(2, 9, (1,), generator=gen))
        k = int(torch.randint(1, n, (1,), generator=gen))
        U = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
        M = random_symmetric(k, gen, dtype)
        return LowRank(U, M), (U.double() @ M.double() @ U.double().T).to(dtype)


class TestLowRankFull(LinearOperatorTestCase):
    """``U M Uᵀ`` with ``U`` square and well conditioned: invertible."""

    structure_preserved = False

    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        U, M = random_matrix(n, n, gen, dtype), random_symmetric(n, gen, dtype)
        return LowRank(U, M), (U.double() @ M.double() @ U.double().T).to(dtype)


def test_low_rank_validates_its_factors():
    with pytest.raises(ValueError, match="M of shape"):
        LowRank(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        LowRank(torch.zeros(3, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        LowRank(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float32))


class TestZero(LinearOperatorTestCase):
    singular = True

    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        return Zero(n, n, dtype=dtype), torch.zeros(n, n, dtype=dtype)


class TestZeroRectangular(LinearOperatorTestCase):
    square = False

    def make_operator(self, dtype, gen):
        m, n = torch.randint(1, 6, (2,), generator=gen).tolist()
        return Zero(m, n + m, dtype=dtype), torch.zeros(m, n + m, dtype=dtype)


class TestScaledIdentity(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        s = float((1 + torch.rand(1, generator=gen)) * signs(1, gen))
        return ScaledIdentity(n, s, dtype=dtype), s * torch.eye(n, dtype=dtype)


class TestDiagonal(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        d = ((1 + torch.rand(n, generator=gen, dtype=torch.float64)) * signs(n, gen)).to(dtype)
        return Diagonal(d), torch.diag(d)


# ---------------------------------------------------------------------------------------
class TestBlockDiagonal(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        sizes = random_sizes(int(torch.randint(1, 6, (1,), generator=gen)), 1, 6, gen)
        blocks, dense = [], {}
        for i, b in enumerate(sizes):
            op, m = nested_square_block(b, gen, dtype, i % 4)
            blocks.append(op)
            dense[i, i] = m
        return BlockDiagonal(blocks), assemble(sizes, sizes, dense).to(dtype)


class TestBlockDiagonalSymmetric(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        sizes = random_sizes(int(torch.randint(1, 6, (1,), generator=gen)), 1, 7, gen)
        blocks, dense = [], {}
        for i, b in enumerate(sizes):
            op, m = nested_square_block(b, gen, dtype, (i + 1) % 4, symmetric=True)
            blocks.append(op)
            dense[i, i] = m
        op = BlockDiagonal(blocks)
        assert op.symmetric
        return op, assemble(sizes, sizes, dense).to(dtype)


class TestBlockDiagonalRectangular(LinearOperatorTestCase):
    square = False

    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        rows = random_sizes(n, 1, 5, gen)
        cols = random_sizes(n, 1, 5, gen)
        if sum(rows) == sum(cols):
            cols[0] += 1
        blocks = [torch.randn(r, c, generator=gen, dtype=torch.float64).to(dtype) for r, c in zip(rows, cols)]
        return BlockDiagonal(blocks), assemble(rows, cols, {(i, i): b for i, b in enumerate(blocks)}).to(dtype)


def _bidiagonal(dtype, gen, lower: bool):
    sizes = random_sizes(int(torch.randint(1, 7, (1,), generator=gen)), 1, 6, gen)
    n = len(sizes)
    diag, off, dense = [], [], {}
    for i, b in enumerate(sizes):
        op, m = nested_square_block(b, gen, dtype, i % 4)
        diag.append(op)
        dense[i, i] = m
    for i in range(n - 1):
        r, c = (sizes[i + 1], sizes[i]) if lower else (sizes[i], sizes[i + 1])
        where = (i + 1, i) if lower else (i, i + 1)
        if i % 3 == 2:
            off.append(Zero(r, c, dtype=dtype))
            continue
        m = random_matrix(r, c, gen, dtype, singular_values=(0.5, 0.5))
        off.append(m)
        dense[where] = m
    cls = BlockLowerBidiagonal if lower else BlockUpperBidiagonal
    return cls(diag, off), assemble(sizes, sizes, dense).to(dtype)


class TestBlockLowerBidiagonal(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        return _bidiagonal(dtype, gen, lower=True)


class TestBlockUpperBidiagonal(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        return _bidiagonal(dtype, gen, lower=False)


def _tridiagonal(dtype, gen, *, nested: bool, singular_diagonal: bool = False, n_max: int = 8):
    sizes = random_sizes(int(torch.randint(1, n_max + 1, (1,), generator=gen)), 1, 7, gen)
    n = len(sizes)
    diag, lower, upper, dense = [], [], [], {}
    for i, b in enumerate(sizes):
        if nested:
            op, m = nested_square_block(b, gen, dtype, i % 4)
        elif singular_diagonal:
            op = m = random_matrix(b, b, gen, dtype, rank=b - 1)
        else:
            op = m = random_matrix(b, b, gen, dtype, singular_values=(2.0, 3.0))
        diag.append(op)
        dense[i, i] = m
    for i in range(n - 1):
        for out, (r, c), where in (
            (lower, (sizes[i + 1], sizes[i]), (i + 1, i)),
            (upper, (sizes[i], sizes[i + 1]), (i, i + 1)),
        ):
            if nested and i % 3 == 1:
                out.append(Zero(r, c, dtype=dtype))
                continue
            if singular_diagonal:
                m = torch.randn(r, c, generator=gen, dtype=torch.float64).to(dtype)
            else:
                m = random_matrix(r, c, gen, dtype, singular_values=(0.4, 0.4))
            out.append(m)
            dense[where] = m
    return BlockTridiagonal(diag, lower, upper), assemble(sizes, sizes, dense).to(dtype)


class TestBlockTridiagonal(LinearOperatorTestCase):
    seeds = (0, 1, 2, 3)

    def make_operator(self, dtype, gen):
        return _tridiagonal(dtype, gen, nested=False)


class TestBlockTridiagonalNested(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        return _tridiagonal(dtype, gen, nested=True)


class TestBlockTridiagonalSingularDiagonalBlocks(LinearOperatorTestCase):
    """Every diagonal block singular, the matrix not (float64: cond is up to ~1e4)."""

    dtypes = (torch.float64,)

    def make_operator(self, dtype, gen):
        op, ref = _tridiagonal(dtype, gen, nested=False, singular_diagonal=True, n_max=10)
        if op.num_blocks > 1:
            assert torch.linalg.cond(ref).item() < 1e5
        else:  # a single singular block is a singular matrix: use a regular one
            op = BlockTridiagonal([ref + torch.eye(ref.shape[0], dtype=dtype)], [], [])
            ref = op.to_dense()
        return op, ref


def _symmetric_tridiagonal(dtype, gen, *, nested: bool, singular_diagonal: bool = False, n_max: int = 8):
    sizes = random_sizes(int(torch.randint(1, n_max + 1, (1,), generator=gen)), 1, 7, gen)
    n = len(sizes)
    diag, lower, dense = [], [], {}
    for i, b in enumerate(sizes):
        if nested:
            op, m = nested_square_block(b, gen, dtype, i % 4, symmetric=True)
        else:
            op = m = random_symmetric(b, gen, dtype, eigenvalues=(2.0, 3.0), rank=b - 1 if singular_diagonal else None)
        diag.append(op)
        dense[i, i] = m
    for i in range(n - 1):
        r, c = sizes[i + 1], sizes[i]
        if nested and i % 3 == 1:
            lower.append(Zero(r, c, dtype=dtype))
            continue
        if singular_diagonal:
            m = torch.randn(r, c, generator=gen, dtype=torch.float64).to(dtype)
        else:
            m = random_matrix(r, c, gen, dtype, singular_values=(0.4, 0.4))
        lower.append(m)
        dense[i + 1, i] = m
        dense[i, i + 1] = m.T
    return SymmetricBlockTridiagonal(diag, lower), assemble(sizes, sizes, dense).to(dtype)


class TestSymmetricBlockTridiagonal(LinearOperatorTestCase):
    seeds = (0, 1, 2, 3)

    def make_operator(self, dtype, gen):
        return _symmetric_tridiagonal(dtype, gen, nested=False)


class TestSymmetricBlockTridiagonalNested(LinearOperatorTestCase):
    def make_operator(self, dtype, gen):
        return _symmetric_tridiagonal(dtype, gen, nested=True)


class TestSymmetricBlockTridiagonalSingularDiagonalBlocks(LinearOperatorTestCase):
    dtypes = (torch.float64,)

    def make_operator(self, dtype, gen):
        op, ref = _symmetric_tridiagonal(dtype, gen, nested=False, singular_diagonal=True, n_max=10)
        if op.num_blocks > 1:
            assert torch.linalg.cond(ref).item() < 1e5
        else:
            m = ref + torch.eye(ref.shape[0], dtype=dtype)
            op, ref = SymmetricBlockTridiagonal([m], []), m
        return op, ref
