"""Selection operators: the sparse 0/1 matrices behind unfolding, padding and max pooling.

``Gather(index, n)`` is the ``m × n`` matrix with ``(S x)_i = x[index[i]]`` (``0`` where
``index[i] = −1``): every row has at most one 1. Unfolding the patches of a
convolution (zero, reflect, replicate or circular padding included), embedding the
parameters of a grouped convolution into a block-sparse matrix and the selection of a
max pool are all of this form. Its transpose is :class:`Scatter` (``index_add``).
Neither is ever formed unless :meth:`to_dense` is asked for.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tallskinny.linalg import LinearOperator
from tallskinny.linalg.kronecker import Product

__all__ = ["DirectProduct", "Gather", "Scatter"]


def _check_index(index: Tensor, n: int, name: str) -> None:
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype != torch.long:
        raise ValueError(f"{name} needs a 1-D int64 index tensor")
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= n):
        raise ValueError(f"{name}: indices must lie in [-1, {n}) (−1 marks a zero row), got "
                         f"[{int(index.min())}, {int(index.max())}]")


class Gather(LinearOperator):
    """``(S x)_i = x[index[i]]``, or ``0`` where ``index[i] = −1``; shape ``(len(index), n)``."""

    def __init__(self, index: Tensor, n: int, *, dtype: torch.dtype = torch.float64, check: bool = True):
        if check:
            _check_index(index, n, "Gather")
        self.index = index
        self.shape = (index.shape[0], int(n))
        self.dtype, self.device = dtype, index.device
        #: ``index`` with ``−1`` replaced by ``n``: the row of a zero appended to the operand
        self.padded = torch.where(index < 0, torch.full_like(index, int(n)), index)

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Gather(self.index, self.shape[1], dtype=dtype, check=False)

    def to_dense(self) -> Tensor:
        m, n = self.shape
        out = torch.zeros(m, n + 1, dtype=self.dtype, device=self.device)
        out[torch.arange(m, device=self.device), self.padded] = 1.0
        return out[:, :n]

    def apply_flops(self) -> int:
        return 0  # a gather / scatter-add: no multiplications

    def _matmat(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(1, x.shape[1])])[self.padded]

    def _transpose(self) -> LinearOperator:
        return Scatter(self)


class Scatter(LinearOperator):
    """The transpose of a :class:`Gather`: ``(Sᵀ y)_j = Σ_{i: index[i] = j} y_i``."""

    def __init__(self, gather: Gather):
        self.gather = gather
        self.shape = (gather.shape[1], gather.shape[0])
        self.dtype, self.device = gather.dtype, gather.device

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Scatter(self.gather.astype(dtype))

    def to_dense(self) -> Tensor:
        return self.gather.to_dense().mT

    def apply_flops(self) -> int:
        return 0  # a gather / scatter-add: no multiplications

    def _matmat(self, y: Tensor) -> Tensor:
        n = self.shape[0]
        out = y.new_zeros(n + 1, y.shape[1])
        out.index_add_(0, self.gather.padded, y)
        return out[:n]

    def _transpose(self) -> LinearOperator:
        return self.gather


class DirectProduct(Product):
    """A lazy :class:`~tallskinny.linalg.kronecker.Product` whose :meth:`to_dense` is
    computed directly by ``dense()`` (e.g. in ``O(nonzeros)`` by a scatter instead of
    multiplying the factors into an identity) and kept; ``block(rows, cols)``, where
    given, makes :meth:`dense_block` the same way without the whole matrix.

    Products go through the factors, whatever the number of vectors: a gather, one
    small GEMM per factor and a scatter cost ``O(nonzeros·k)``, while the dense matrix
    costs ``a_out·a_in·k`` (``B·L/9`` times more for a 3×3 convolution) and is slower at
    every ``k`` measured (CHANGELOG). The dense matrix is made only where it is asked for
    (the dense stages of the elimination); the transpose shares it."""

    def __init__(self, *factors, dense: Callable[[], Tensor],
                 block: Callable[[Tensor | None, Tensor | None], Tensor] | None = None):
        super().__init__(*factors)
        self._dense_fn: Callable[[], Tensor] | None = dense
        self._dense: Tensor | None = None
        self._block = block

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        if dtype == self.dtype:
            return self
        block = None if self._block is None else (lambda rows, cols: self.dense_block(rows, cols).to(dtype))
        return DirectProduct(*(f.astype(dtype) for f in self.factors), dense=lambda: self.to_dense().to(dtype), block=block)

    def to_dense(self) -> Tensor:
        if self._dense is None:
            self._dense = self._dense_fn()
            self._dense_fn = None
        return self._dense

    def dense_block(self, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        if self._dense is not None or self._block is None:
            return super().dense_block(rows, cols)
        return self._block(rows, cols)

    def _transpose(self) -> LinearOperator:
        block = None if self._block is None else (lambda rows, cols: self.dense_block(cols, rows).mT)
        return DirectProduct(*(f.T for f in reversed(self.factors)), dense=lambda: self.to_dense().mT, block=block)
