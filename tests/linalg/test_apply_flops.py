"""``LinearOperator.apply_flops``: the multiply-adds of one product as ``_matmat`` runs it."""

import torch

from tallskinny.linalg import Dense, Diagonal, Identity, LowRank, Zero
from tallskinny.linalg.kronecker import Kronecker, Permutation, Product


def _count_mm_flops(op, n_columns=1):
    """The flops of the matrix products ``op @ x`` runs (mm / addmm / bmm / matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(op.shape[1], n_columns, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        op.matmat(x)
    return counter.get_total_flops()


def test_structured_operators_count_what_they_multiply():
    W = torch.randn(3, 4, dtype=torch.float64)
    perm = Permutation(torch.randperm(15))
    kron = Kronecker(Identity(5), Dense(W))  # I_5 ⊗ W: 15 × 20
    prod = Product(perm, kron)
    assert Dense(W).apply_flops() == 2 * 12
    assert kron.apply_flops() == 5 * 2 * 12
    assert prod.apply_flops() == kron.apply_flops()
    assert perm.apply_flops() == 0 and Zero(3, 4).apply_flops() == 0
    assert Diagonal(torch.ones(4, dtype=torch.float64)).apply_flops() == 0
    U = torch.randn(6, 2, dtype=torch.float64)
    assert LowRank(U, torch.eye(2, dtype=torch.float64)).apply_flops() == 4 * 12 + 8
    for op in (Dense(W), kron, prod):  # what the products themselves report
        assert op.apply_flops() == _count_mm_flops(op)


def test_the_generic_count_is_a_dense_product():
    class Opaque(Dense):  # an operator that says nothing of its structure
        pass

    assert Opaque(torch.randn(7, 5, dtype=torch.float64)).apply_flops() == 70
