"""Products of a matrix with a thin block of columns, computed wide.

``M X`` for ``X`` of ``k ≪ n`` columns is computed as ``(Xᵀ Mᵀ)ᵀ``: the same arithmetic,
with the thin dimension as the rows of the product. MKL's GEMM (the torch CPU wheel) runs
the tall product with few columns far below its rate; the wide one is 1.5–9× faster for
``M`` of order ``≥ 256`` and 2 to 32 columns, and equal at 12 (a fast path of MKL's for
every layout): ``python bench/lu.py --layouts``. Below :data:`WIDE_MIN`, for one column,
and for more than ``n/THIN_RATIO`` columns the plain product is kept (there the answer's
layout costs more downstream than the product saves). The wide answer is the transpose
of a row-major ``k × n`` matrix (column-major, as LAPACK's solves leave theirs); its
values equal those of ``M @ X`` to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["THIN_RATIO", "WIDE_MIN", "thin_addmm", "thin_product"]

WIDE_MIN = 256
"""Smallest dimension of ``M`` from which products with two or more columns are made wide."""


THIN_RATIO = 8
"""A block is thin where its columns are at most ``1/THIN_RATIO`` of ``M``'s smaller
dimension (a wider one makes a square product, where transposed operands can take MKL's
slow path)."""


def _wide(M: Tensor, X: Tensor) -> bool:
    """Two or more columns, a thin block, and ``M``'s smaller dimension at least
    :data:`WIDE_MIN`."""
    n = min(M.shape[0], M.shape[1])
    return n >= WIDE_MIN and 1 < X.shape[-1] <= n // THIN_RATIO


def thin_product(M: Tensor, X: Tensor) -> Tensor:
    """``M X`` for a 2-D ``X`` (``n × k``), as ``(Xᵀ Mᵀ)ᵀ`` where that pays."""
    return (X.mT @ M.mT).mT if _wide(M, X) else M @ X


def thin_addmm(T: Tensor, M: Tensor, X: Tensor, *, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``β T + α M X`` (``torch.addmm``) for 2-D ``T``, ``X``, as ``(β Tᵀ + α Xᵀ Mᵀ)ᵀ``
    where that pays."""
    if _wide(M, X):
        return T.mT.addmm(X.mT, M.mT, alpha=alpha, beta=beta).mT
    return torch.addmm(T, M, X, alpha=alpha, beta=beta)
