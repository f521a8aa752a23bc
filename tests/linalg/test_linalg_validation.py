"""Bad input raises a clear error that names the offending block, before any work."""

from __future__ import annotations

import re

import pytest
import torch

from tallskinny.linalg import (
    BlockDiagonal,
    BlockLowerBidiagonal,
    BlockTridiagonal,
    BlockUpperBidiagonal,
    Dense,
    Diagonal,
    SymmetricBlockTridiagonal,
)




F64 = torch.float64


def eye(n, dtype=F64):
    return torch.eye(n, dtype=dtype)


def ones(r, c, dtype=F64):
    return torch.ones(r, c, dtype=dtype)


def test_diagonal_blocks_must_be_square():
    with pytest.raises(ValueError, match=re.escape("diagonal block 1 has shape (2, 3)")):
        BlockTridiagonal([eye(2), ones(2, 3), eye(3)], [ones(2, 2), ones(3, 2)], [ones(2, 2), ones(2, 3)])
    with pytest.raises(ValueError, match="diagonal block 0 .* must be square"):
        SymmetricBlockTridiagonal([ones(1, 2)], [])


def test_off_diagonal_list_lengths():
    with pytest.raises(ValueError, match="'lower' has 1 blocks, expected 2"):
        BlockTridiagonal([eye(2), eye(3), eye(1)], [ones(3, 2)], [ones(2, 3), ones(3, 1)])
    with pytest.raises(ValueError, match="'upper' has 3 blocks, expected 2"):
        BlockUpperBidiagonal([eye(2), eye(3), eye(1)], [ones(2, 3), ones(3, 1), ones(1, 1)])


def test_off_diagonal_shapes_name_the_block():
    msg = "lower block 1 (block (2, 1) of the matrix) has shape (2, 3), expected (1, 3)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        BlockLowerBidiagonal([eye(2), eye(3), eye(1)], [ones(3, 2), ones(2, 3)])
    msg = "upper block 0 (block (0, 1) of the matrix) has shape (3, 2), expected (2, 3)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        BlockTridiagonal([eye(2), eye(3)], [ones(3, 2)], [ones(3, 2)])
    with pytest.raises(ValueError, match=re.escape("lower block 0 (block (1, 0) of the matrix) has shape (2, 2), expected (3, 2)")):
        SymmetricBlockTridiagonal([eye(2), eye(3)], [ones(2, 2)])


def test_mixed_dtypes_name_the_block():
    with pytest.raises(TypeError, match="upper block 1 .* has dtype torch.float32, but diagonal block 0 has dtype torch.float64"):
        BlockTridiagonal([eye(1)] * 3, [ones(1, 1)] * 2, [ones(1, 1), ones(1, 1, torch.float32)])
    with pytest.raises(TypeError, match="diagonal block 2 has dtype torch.float32"):
        BlockDiagonal([eye(1), eye(2), eye(2, torch.float32)])


def test_integer_and_half_blocks_are_rejected():
    with pytest.raises(TypeError, match="diagonal block 1 has dtype torch.int64"):
        BlockDiagonal([eye(2), torch.ones(2, 2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="float32 or float64"):
        BlockDiagonal([Dense(torch.eye(2, dtype=torch.float16))])


def test_mixed_devices_name_the_block():
    meta = Dense(torch.zeros(2, 2, device="meta", dtype=F64))
    with pytest.raises(ValueError, match="diagonal block 1 is on device meta, but diagonal block 0 is on cpu"):
        BlockDiagonal([eye(2), meta])
    with pytest.raises(ValueError, match="lower block 0 .* is on device meta"):
        BlockLowerBidiagonal([eye(2), eye(2)], [meta])


def test_blocks_of_the_wrong_kind():
    with pytest.raises(TypeError, match="diagonal block 1 must be a torch.Tensor or a LinearOperator, got list"):
        BlockDiagonal([eye(2), [[1.0]]])
    with pytest.raises(ValueError, match=re.escape("lower block 0 must be a 2-D tensor or a LinearOperator, got a tensor of shape (3,)")):
        BlockLowerBidiagonal([eye(3), eye(3)], [torch.ones(3, dtype=F64)])
    with pytest.raises(TypeError, match="must be a sequence of blocks"):
        BlockDiagonal(3)
    with pytest.raises(ValueError, match="at least one diagonal block"):
        BlockDiagonal([])
    with pytest.raises(ValueError, match="must not be empty"):
        BlockTridiagonal([eye(2), torch.zeros(0, 0, dtype=F64)], [torch.zeros(0, 2, dtype=F64)], [torch.zeros(2, 0, dtype=F64)])


def test_a_stacked_3d_tensor_gives_uniform_blocks():
    stack = torch.randn(4, 3, 3, dtype=F64)
    op = BlockDiagonal(stack)
    assert op.row_sizes == (3, 3, 3, 3)
    assert torch.equal(op.to_dense(), torch.block_diag(*stack))


def test_asymmetric_diagonal_block_is_rejected():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    with pytest.raises(ValueError, match="diagonal block 1 is not symmetric"):
        SymmetricBlockTridiagonal([eye(3), a, eye(1)], [ones(2, 3), ones(1, 2)])
    # rounding-level asymmetry is fine
    b = torch.tensor([[1.0, 2.0], [2.0 + 1e-15, 1.0]], dtype=F64)
    SymmetricBlockTridiagonal([eye(3), b], [ones(2, 3)])
    # blocks declared symmetric are trusted (their lower triangle is what is used)
    SymmetricBlockTridiagonal([eye(3), Dense(a, symmetric=True)], [ones(2, 3)])


OPERATORS = [
    lambda: BlockDiagonal([eye(2), eye(3)]),
    lambda: BlockLowerBidiagonal([eye(2), eye(3)], [ones(3, 2)]),
    lambda: BlockUpperBidiagonal([eye(2), eye(3)], [ones(2, 3)]),
    lambda: BlockTridiagonal([eye(2), eye(3)], [ones(3, 2)], [ones(2, 3)]),
    lambda: SymmetricBlockTridiagonal([2 * eye(2), 2 * eye(3)], [0.1 * ones(3, 2)]),
    lambda: Diagonal(torch.ones(5, dtype=F64)),
]


@pytest.mark.parametrize("make", OPERATORS)
def test_wrong_vectors_at_matmul_and_solve(make):
    op = make()
    f = op.factorize()
    for call in (op.__matmul__, op.solve, f.solve):
        with pytest.raises(ValueError, match=r"\(5,\) or \(5, k\).*got \(4,\)"):
            call(torch.ones(4, dtype=F64))
        with pytest.raises(ValueError, match="got"):
            call(torch.ones(5, 2, 1, dtype=F64))
        with pytest.raises(TypeError, match="dtype torch.float32"):
            call(torch.ones(5, dtype=torch.float32))
        with pytest.raises(ValueError, match="meta"):
            call(torch.ones(5, dtype=F64, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        f.solve([1.0] * 5)


def test_inertia_of_a_non_symmetric_factorization_is_a_type_error():
    f = BlockTridiagonal([eye(2), eye(3)], [ones(3, 2)], [ones(2, 3)]).factorize()
    with pytest.raises(TypeError, match="symmetric"):
        f.inertia()
    with pytest.raises(TypeError, match="symmetric"):
        BlockLowerBidiagonal([eye(2), eye(3)], [ones(3, 2)]).factorize().inertia()
