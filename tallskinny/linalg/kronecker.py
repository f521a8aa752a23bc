"""Kronecker products, permutations and lazy products of operators.

Vectors are row-major vectorisations of matrices: ``vec(M)`` lists ``M`` row by row. With
that convention ``(A ⊗ B) vec(M) = vec(A M Bᵀ)`` for ``M`` of shape ``(A.cols, B.cols)``,
which is how :class:`Kronecker` applies itself without ever forming ``A ⊗ B``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from .operators import Dense, LinearOperator, ScaledIdentity, check_compatible, as_operator


class Kronecker(LinearOperator):
    """``A ⊗ B`` for operators (or tensors) ``A`` (``p × q``) and ``B`` (``r × s``).

    Shape ``(p·r, q·s)``. Applying it to ``k`` vectors costs one product with ``A`` and one
    with ``B`` on reshaped data: ``O(k·(p·q·s + q·r·s))`` for dense factors.
    """

    def __init__(self, left, right):
        self.left, self.right = as_operator(left), as_operator(right)
        check_compatible(self.left, self.right, "form a Kronecker product of")
        (p, q), (r, s) = self.left.shape, self.right.shape
        self.shape = (p * r, q * s)
        self.dtype, self.device = self.left.dtype, self.left.device
        self.symmetric = self.left.symmetric and self.right.symmetric

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Kronecker(self.left.astype(dtype), self.right.astype(dtype))

    def to_dense(self) -> Tensor:
        return kron(self.left.to_dense(), self.right.to_dense())

    def apply_flops(self) -> int:
        """``A ⊗ B`` on ``X`` (``q × s``): ``B`` on ``q`` columns, then ``A`` on ``r``."""
        (p, q), (r, s) = self.left.shape, self.right.shape
        return q * self.right.apply_flops() + r * self.left.apply_flops()

    def _matmat(self, x: Tensor) -> Tensor:
        (p, q), (r, s) = self.left.shape, self.right.shape
        k = x.shape[1]
        X = x.reshape(q, s, k)
        if _is_identity(self.left) and isinstance(self.right, Dense):
            # I ⊗ B: B acts on each of the q blocks, one broadcast product, no transposes;
            # one column: the blocks are the rows of one GEMM, X Bᵀ (not q matrix-vector products)
            if k == 1:
                return (X.reshape(q, s) @ self.right.matrix.mT).reshape(p * r, 1)
            return (self.right.matrix @ X).reshape(p * r, k)
        if not _is_identity(self.right):
            Xb = X.transpose(0, 1).reshape(s, q * k)  # B acts on the column index
            X = self.right._matmat(Xb).reshape(r, q, k).transpose(0, 1)
        if not _is_identity(self.left):
            X = self.left._matmat(X.reshape(q, -1)).reshape(p, r, k)
        return X.reshape(p * r, k)

    def _transpose(self) -> LinearOperator:
        return Kronecker(self.left.T, self.right.T)

    def _scale(self, alpha: float) -> LinearOperator:
        return Kronecker(self.left._scale(alpha), self.right)


class Permutation(LinearOperator):
    """The permutation matrix ``P`` with ``(P x)_i = x_{index[i]}``."""

    def __init__(self, index: Tensor, *, dtype: torch.dtype = torch.float64):
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype != torch.long:
            raise ValueError("Permutation needs a 1-D tensor of int64 indices")
        n = index.shape[0]
        if n and not torch.equal(torch.sort(index).values, torch.arange(n, device=index.device)):
            raise ValueError(f"the indices of a Permutation must be a permutation of 0..{n - 1}")
        self.index = index
        self._inverse: Permutation | None = None
        self._transposed_orders: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.shape = (n, n)
        self.dtype, self.device = dtype, index.device

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Permutation(self.index, dtype=dtype)

    def to_dense(self) -> Tensor:
        return torch.eye(self.shape[0], dtype=self.dtype, device=self.device)[self.index]

    def apply_flops(self) -> int:
        return 0  # a gather

    def _matmat(self, x: Tensor) -> Tensor:
        return x[self.index]

    def transposed_order(self, m: int, q: int) -> tuple[Tensor, Tensor]:
        """For ``x`` read as an ``m × q`` matrix ``X = reshape(P x)``: the indices ``o`` with
        ``x[o] = vec(Xᵀ)`` and their inverse permutation (made once per shape)."""
        cached = self._transposed_orders.get((m, q))
        if cached is None:
            order = self.index.reshape(m, q).T.reshape(-1)
            cached = self._transposed_orders[(m, q)] = (order, torch.argsort(order))
        return cached

    def _transpose(self) -> LinearOperator:
        if self._inverse is None:
            self._inverse = Permutation(torch.argsort(self.index), dtype=self.dtype)
            self._inverse._inverse = self
        return self._inverse


class Product(LinearOperator):
    """The lazy product ``F_1 F_2 ⋯ F_n`` (applied right to left, never formed)."""

    def __init__(self, *factors):
        if not factors:
            raise ValueError("Product needs at least one factor")
        self.factors = tuple(as_operator(f) for f in factors)
        for a, b in zip(self.factors, self.factors[1:]):
            check_compatible(a, b, "matmul")
        self.shape = (self.factors[0].shape[0], self.factors[-1].shape[1])
        self.dtype, self.device = self.factors[0].dtype, self.factors[0].device

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Product(*(f.astype(dtype) for f in self.factors))

    def to_dense(self) -> Tensor:
        out = self.factors[-1].to_dense()
        for f in reversed(self.factors[:-1]):
            out = f @ out
        return out

    def apply_flops(self) -> int:
        return sum(f.apply_flops() for f in self.factors)

    def _matmat(self, x: Tensor) -> Tensor:
        for f in reversed(self.factors):  # shapes were checked when the product was made
            x = f._matmat(x)
        return x

    def dense_block(self, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        """``P M`` with ``P`` a permutation: ``M``'s block on the rows ``P`` picks."""
        first, rest = self.factors[0], self.factors[1:]
        if isinstance(first, Permutation) and len(rest) == 1:
            return rest[0].dense_block(first.index if rows is None else first.index[rows], cols)
        return super().dense_block(rows, cols)

    def _transpose(self) -> LinearOperator:
        return Product(*(f.T for f in reversed(self.factors)))


def kron(a: Tensor, b: Tensor) -> Tensor:
    """The dense Kronecker product of two matrices (``torch.kron`` without its stride
    pitfalls: it fails on some views with unit dimensions)."""
    (p, q), (r, s) = a.shape, b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(p * r, q * s)


def _is_identity(op: LinearOperator) -> bool:
    return isinstance(op, ScaledIdentity) and op.scale == 1.0


def transpose_permutation(rows: int, cols: int, *, device=None) -> Tensor:
    """Indices that turn ``vec(M)`` into ``vec(Mᵀ)`` for an ``rows × cols`` matrix ``M``.

    One shared tensor per shape and device (do not modify it): structure checks can then
    recognise it by identity instead of comparing indices."""
    return _transpose_permutation(rows, cols, device)


def identity_kronecker_factor(op: LinearOperator) -> Tensor | None:
    """``W`` if ``op = I_R ⊗ W`` with a dense ``W`` (block-diagonal with equal blocks), else
    ``None``; ``R = op.shape[0] // W.shape[0]``."""
    if (
        isinstance(op, Kronecker)
        and isinstance(op.left, ScaledIdentity)
        and op.left.scale == 1.0
        and isinstance(op.right, Dense)
    ):
        return op.right.matrix
    return None


@functools.lru_cache(maxsize=512)
def _transpose_permutation(rows: int, cols: int, device) -> Tensor:
    return torch.arange(rows * cols, device=device).reshape(rows, cols).T.reshape(-1)


@functools.lru_cache(maxsize=256)
def padded_identity_matrix(rows: int, cols: int, dtype: torch.dtype, device) -> Tensor:
    """``[I_cols; 0]`` (``rows ≥ cols``), one shared tensor per shape (do not modify it)."""
    return torch.eye(rows, cols, dtype=dtype, device=device)


__all__: Sequence[str] = ["Kronecker", "Permutation", "Product", "kron", "identity_kronecker_factor", "padded_identity_matrix", "transpose_permutation"]
