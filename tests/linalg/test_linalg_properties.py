"""Property-based tests over random ragged block structures (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tallskinny.linalg import (
    BlockDiagonal,
    BlockLowerBidiagonal,
    BlockTridiagonal,
    BlockUpperBidiagonal,
    Diagonal,
    ScaledIdentity,
)
from tallskinny.linalg.testing import (
    random_block_tridiagonal,
    random_symmetric_block_tridiagonal,
    relative_error,
)




F64 = torch.float64
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes_st = st.lists(st.integers(1, 8), min_size=1, max_size=25)
seeds = st.integers(0, 2**31 - 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@SETTINGS
@given(sizes=sizes_st, seed=seeds, coupling=st.floats(0.0, 0.9))
def test_block_lu_solves_dominant_systems(sizes, seed, coupling):
    op = random_block_tridiagonal(sizes, gen(seed), coupling=coupling)
    M = op.to_dense()
    B = torch.randn(M.shape[0], 2, generator=gen(seed + 1), dtype=F64)
    f = op.factorize()
    assert relative_error(f.solve(B), torch.linalg.solve(M, B)) <= 1e-12
    assert relative_error(op @ B, M @ B) <= 1e-14
    sign, logabs = torch.linalg.slogdet(M)
    assert f.sign().item() == sign.item()
    assert abs(f.logdet().item() - logabs.item()) <= 1e-11 * max(1.0, abs(logabs.item()))


@SETTINGS
@given(sizes=sizes_st, seed=seeds, negative=st.floats(0.0, 1.0), coupling=st.floats(0.0, 0.9))
def test_block_ldl_inertia_and_logdet(sizes, seed, negative, coupling):
    op = random_symmetric_block_tridiagonal(sizes, gen(seed), negative_fraction=negative, coupling=coupling)
    M = op.to_dense()
    f = op.factorize()
    ev = torch.linalg.eigvalsh(M)
    assert tuple(f.inertia()) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    assert abs(f.logdet().item() - ev.abs().log().sum().item()) <= 1e-11 * max(1.0, M.shape[0])
    assert f.sign().item() == torch.sign(ev).prod().item()
    b = torch.randn(M.shape[0], generator=gen(seed + 1), dtype=F64)
    assert relative_error(f.solve(b), torch.linalg.solve(M, b)) <= 1e-12


@SETTINGS
@given(sizes=st.lists(st.integers(1, 8), min_size=2, max_size=20), seed=seeds, symmetric=st.booleans())
def test_singular_diagonal_blocks(sizes, seed, symmetric):
    make = random_symmetric_block_tridiagonal if symmetric else random_block_tridiagonal
    op = make(sizes, gen(seed), singular_diagonal=True)
    M = op.to_dense()
    assume(torch.linalg.cond(M).item() < 1e5)
    f = op.factorize()
    b = torch.randn(M.shape[0], 3, generator=gen(seed + 1), dtype=F64)
    assert relative_error(f.solve(b), torch.linalg.solve(M, b)) <= 1e-10
    if symmetric:
        ev = torch.linalg.eigvalsh(M)
        assert tuple(f.inertia()) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)


def _random_block_operator(kind: int, sizes, seed):
    g = gen(seed)
    n = len(sizes)

    def block(r, c, j):
        if r == c and j % 3 == 1:
            return Diagonal(torch.randn(r, generator=g, dtype=F64))
        if r == c and j % 3 == 2:
            return ScaledIdentity(r, float(torch.randn(1, generator=g)))
        return torch.randn(r, c, generator=g, dtype=F64)

    diag = [block(b, b, j) for j, b in enumerate(sizes)]
    low = [block(sizes[i + 1], sizes[i], i) for i in range(n - 1)]
    up = [block(sizes[i], sizes[i + 1], i + 1) for i in range(n - 1)]
    return [
        lambda: BlockDiagonal(diag),
        lambda: BlockLowerBidiagonal(diag, low),
        lambda: BlockUpperBidiagonal(diag, up),
        lambda: BlockTridiagonal(diag, low, up),
    ][kind]()


@SETTINGS
@given(sizes=sizes_st, seed=seeds, kinds=st.tuples(st.integers(0, 3), st.integers(0, 3)), alpha=st.floats(-3, 3))
def test_algebra_matches_dense(sizes, seed, kinds, alpha):
    a = _random_block_operator(kinds[0], sizes, seed)
    b = _random_block_operator(kinds[1], sizes, seed + 1)
    A, B = a.to_dense(), b.to_dense()
    x = torch.randn(A.shape[1], 2, generator=gen(seed), dtype=F64)
    for op, dense in ((a + b, A + B), (a - alpha * b, A - alpha * B), (a @ b, A @ B), (a.T @ b, A.T @ B), (a @ b.T, A @ B.T)):
        assert relative_error(op.to_dense(), dense) <= 1e-13
        assert relative_error(op @ x, dense @ x) <= 1e-13
    assert relative_error(x.T @ a, x.T @ A) <= 1e-14
