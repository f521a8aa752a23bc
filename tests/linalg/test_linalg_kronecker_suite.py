"""The shared operator suite for the operators of ``tallskinny/linalg/kronecker.py``
(``Kronecker``, ``Permutation``, ``Product``), against ``torch.kron`` and dense products."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg import Dense, Diagonal, Identity
from tallskinny.linalg.kronecker import Kronecker, Permutation, Product
from tallskinny.linalg.testing import LinearOperatorTestCase, random_matrix, random_symmetric




def _two_sizes(gen):
    return torch.randint(1, 4, (2,), generator=gen).tolist()


class TestKronecker(LinearOperatorTestCase):
    structure_preserved = False

    def make_operator(self, dtype, gen):
        p, r = _two_sizes(gen)
        A, B = random_matrix(p, p, gen, dtype), random_matrix(r, r, gen, dtype)
        return Kronecker(A, B), torch.kron(A.double(), B.double()).to(dtype)


class TestKroneckerWithIdentity(LinearOperatorTestCase):
    structure_preserved = False

    def make_operator(self, dtype, gen):
        p, r = _two_sizes(gen)
        B = random_matrix(r, r, gen, dtype)
        dense = torch.kron(torch.eye(p, dtype=torch.float64), B.double()).to(dtype)
        return Kronecker(Identity(p, dtype=dtype), B), dense


class TestKroneckerSymmetric(LinearOperatorTestCase):
    structure_preserved = False

    def make_operator(self, dtype, gen):
        p, r = _two_sizes(gen)
        A, B = random_symmetric(p, gen, dtype), random_symmetric(r, gen, dtype)
        op = Kronecker(Dense(A, symmetric=True), Dense(B, symmetric=True))
        return op, torch.kron(A.double(), B.double()).to(dtype)


class TestPermutation(LinearOperatorTestCase):
    structure_preserved = False

    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        index = torch.randperm(n, generator=gen)
        return Permutation(index, dtype=dtype), torch.eye(n, dtype=dtype)[index]


class TestProduct(LinearOperatorTestCase):
    structure_preserved = False

    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        A = random_matrix(n, n, gen, dtype)
        d = (1 + torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype)
        return Product(Dense(A), Diagonal(d)), (A.double() @ torch.diag(d.double())).to(dtype)


class TestPermutedProduct(LinearOperatorTestCase):
    """``P M`` with a permutation first: its ``dense_block`` is ``M``'s on ``P``'s rows."""

    structure_preserved = False

    def make_operator(self, dtype, gen):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        A = random_matrix(n, n, gen, dtype)
        index = torch.randperm(n, generator=gen)
        return Product(Permutation(index, dtype=dtype), Dense(A)), A.double()[index].to(dtype)


def test_identity_kronecker_factor():
    """``W`` of ``I_R ⊗ W`` (dense ``W``); ``None`` for any other form."""
    import torch
    from tallskinny.linalg import Dense, Identity, ScaledIdentity
    from tallskinny.linalg.kronecker import Kronecker, identity_kronecker_factor

    W = torch.randn(3, 2, dtype=torch.float64)
    assert identity_kronecker_factor(Kronecker(Identity(4), Dense(W))) is W
    assert identity_kronecker_factor(Kronecker(ScaledIdentity(4, 2.0), Dense(W))) is None
    assert identity_kronecker_factor(Kronecker(Dense(torch.eye(1, dtype=torch.float64)), Dense(W))) is None
    assert identity_kronecker_factor(Dense(W)) is None
