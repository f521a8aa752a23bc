"""Solves with an LU factorization ``P A = L U``, the factor kept row-major.

LAPACK's ``getrf`` (``torch.linalg.lu_factor``) leaves ``L`` and ``U`` column-major,
and ``getrs`` (``lu_solve``) runs its two triangular solves on them. The same two
``trsm`` calls on a row-major copy of the factor (one ``n²`` copy per factorization) take
the transposed kernels, which MKL runs faster on wide right-hand sides, in place on the
one buffer of ``P B``: 1.7–2.8× in float32 from 32 columns, 1.1–1.3× in float64 from
``max(64, n/8)`` (``python bench/lu.py``, one thread), slower on thin ones (1–8 columns:
0.5–0.9×). Thin right-hand sides, orders below :data:`ROW_MAJOR_MIN`, batched factors
and factors off the CPU go to ``lu_solve`` as they are (no host synchronisation for
the permutation).
The arithmetic is that of ``getrs`` (the same row interchanges and substitutions) in
another kernel order: the answers differ by rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LUFactors", "ROW_MAJOR_MIN", "in_layout_of", "pivots_to_permutation"]

ROW_MAJOR_MIN = 128
"""Order from which :class:`LUFactors` solves through the row-major copy."""


def in_layout_of(X: Tensor, B: Tensor) -> Tensor:
    """``X`` (a solve's answer, column-major as LAPACK leaves it) row-major where the
    right-hand side ``B`` was a row-major matrix of several columns. Products whose two
    operands are both column-major (``Aᵀ X`` with ``A`` row-major) take a slow path of
    MKL's GEMM: 2.5–4× the time of the same product with a row-major ``X`` at
    ``128 × 128`` by 7 columns, 6–8× at 256–1024 (``python bench/lu.py --layouts``); the
    copy costs ``O(n·k)``."""
    if B.dim() == 2 and B.shape[-1] > 1 and B.stride(-1) == 1 and X.stride(-1) != 1:
        return X.contiguous()
    return X


def pivots_to_permutation(pivots: Tensor) -> Tensor:
    """The row order ``p`` with ``(P A)[i] = A[p[i]]`` from LAPACK's 1-based pivots
    (row ``i`` was swapped with row ``pivots[i]``, in turn)."""
    order = list(range(pivots.shape[-1]))
    for i, j in enumerate(pivots.tolist()):
        j -= 1
        if i != j:
            order[i], order[j] = order[j], order[i]
    return torch.tensor(order, dtype=torch.long, device=pivots.device)


class LUFactors:
    """``lu, pivots`` of :func:`torch.linalg.lu_factor`, ready for repeated solves."""

    __slots__ = ("lu", "pivots", "_rows", "_order")

    def __init__(self, lu: Tensor, pivots: Tensor):
        self.lu, self.pivots = lu, pivots
        self._rows = self._order = None

    def row_major_pays(self, columns: int) -> bool:
        """Whether ``columns`` right-hand sides go through the row-major factor: a 2-D
        factor of order ``≥ ROW_MAJOR_MIN`` on the CPU, and enough columns (the
        transposed kernels lose on thin blocks: 0.5–0.9× ``lu_solve`` at 1–8 columns)."""
        n = self.lu.shape[-1]
        if self.lu.dim() != 2 or n < ROW_MAJOR_MIN or self.lu.device.type != "cpu":
            return False
        wide = 32 if self.lu.dtype == torch.float32 else max(64, n // 8)
        return columns >= wide

    def solve(self, B: Tensor) -> Tensor:
        """``A⁻¹ B`` (``B``: ``n`` or ``n × k``; batched ``B`` or factors, and anything
        autograd records (``out=`` solves are not differentiable): as ``lu_solve``)."""
        recorded = torch.is_grad_enabled() and (B.requires_grad or self.lu.requires_grad)
        if B.dim() > 2 or recorded or not self.row_major_pays(B.shape[-1] if B.dim() > 1 else 1):
            if B.dim() == 1 and self.lu.dim() == 2:
                return torch.linalg.lu_solve(self.lu, self.pivots, B.unsqueeze(-1)).squeeze(-1)
            return in_layout_of(torch.linalg.lu_solve(self.lu, self.pivots, B), B)
        if self._rows is None:  # (made on the first wide solve)
            self._rows = self.lu.contiguous()
            self._order = pivots_to_permutation(self.pivots)
        Y = B.index_select(0, self._order)  # P B: the one new buffer; the solves overwrite it
        torch.linalg.solve_triangular(self._rows, Y, upper=False, unitriangular=True, out=Y)
        torch.linalg.solve_triangular(self._rows, Y, upper=True, out=Y)
        return Y
