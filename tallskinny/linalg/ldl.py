"""Bunch–Kaufman ``LDLᵀ`` with an explicit unit lower triangular ``L``.

LAPACK's ``sytrf`` (``torch.linalg.ldl_factor``, lower) returns a symmetric ``A`` as
``L D Lᵀ`` in product form, ``L = P_1 L_1 P_2 L_2 ⋯``: the interchange of each step is
applied to the columns after it only, and ``D`` has ``1×1`` and ``2×2`` diagonal blocks.
Applying every interchange to the columns before it as well (LAPACK's ``syconv``) gives
``A[p][:, p] = L D Lᵀ`` with one permutation ``p`` and a unit lower triangular ``L``.
Then ``Bᵀ A⁻¹ B = Wᵀ D⁻¹ W`` with ``W = L⁻¹ B[p]``: one triangular solve where an LU
needs two, and a product that is symmetric by construction (a Schur complement).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .factor import ldl_d_eigenvalues

__all__ = ["ExplicitLDL", "explicit_ldl"]


class ExplicitLDL(NamedTuple):
    """``A[perm][:, perm] = L D Lᵀ``: ``D``'s diagonal ``d``, its subdiagonal ``e`` (zero
    outside the ``2×2`` blocks, whose first rows are ``pairs``) and its eigenvalues."""

    L: Tensor
    perm: Tensor
    inverse: Tensor
    d: Tensor
    e: Tensor
    pairs: Tensor
    eigenvalues: Tensor

    def lower_solve(self, B: Tensor) -> Tensor:
        """``W = L⁻¹ B[perm]`` (``n × k``; row-major, solved in place in the gathered copy:
        faster than LAPACK's column-major answer at ``n = 512``, and what the products
        with it want, :func:`~tallskinny.linalg.lu.in_layout_of`)."""
        W = B.index_select(0, self.perm)
        return torch.linalg.solve_triangular(self.L, W, upper=False, unitriangular=True, out=W)

    def pivot_solve(self, W: Tensor) -> Tensor:
        """``D⁻¹ W`` (a ``2×2`` block scaled by its off-diagonal entry first, as LAPACK's
        ``sytrs`` does)."""
        Y = W / self.d.unsqueeze(-1)
        t = self.pairs
        if t.numel():
            b = self.e[t].unsqueeze(-1)
            a_b, c_b = self.d[t].unsqueeze(-1) / b, self.d[t + 1].unsqueeze(-1) / b
            x1, x2 = W[t] / b, W[t + 1] / b
            denom = a_b * c_b - 1.0
            Y[t] = (c_b * x1 - x2) / denom
            Y[t + 1] = (a_b * x2 - x1) / denom
        return Y

    def upper_solve(self, Y: Tensor) -> Tensor:
        """``A⁻¹``'s last half: ``L⁻ᵀ Y`` (``n × k``) put back in ``A``'s order."""
        return torch.linalg.solve_triangular(self.L.mT, Y, upper=True, unitriangular=True).index_select(0, self.inverse)

    def solve(self, B: Tensor) -> Tensor:
        return self.upper_solve(self.pivot_solve(self.lower_solve(B)))


def explicit_ldl(ld: Tensor, pivots: Tensor) -> ExplicitLDL:
    """The explicit factors of ``torch.linalg.ldl_factor``'s ``(LD, pivots)`` (lower,
    LAPACK's 1-based pivots: ``k`` swapped with ``pivots[k] − 1`` for a ``1×1`` block;
    ``k + 1`` with ``−pivots[k] − 1`` for a ``2×2`` block on ``k, k + 1``). The
    interchanges are applied on the host, one row pair at a time (``O(n)`` each), to a
    row-major copy (LAPACK's column-major rows would be strided: 3–4× slower swaps); a
    row-major ``ld`` is overwritten."""
    n = ld.shape[0]
    d, eigenvalues = ld.diagonal().clone(), ldl_d_eigenvalues(ld, pivots)
    e = ld.diagonal(-1).clone()
    L = ld.contiguous().tril_(-1)
    host = L if L.device.type == "cpu" else L.cpu()
    rows = host.numpy()
    perm = list(range(n))
    pairs = []
    piv = pivots.tolist()
    k = 0
    while k < n:
        if piv[k] > 0:
            a, b, size = k, piv[k] - 1, 1
        else:
            a, b, size = k + 1, -piv[k] - 1, 2
            pairs.append(k)
        if a != b:
            ra, rb = rows[a], rows[b]
            saved = ra[:k].copy()
            ra[:k] = rb[:k]
            rb[:k] = saved
            perm[a], perm[b] = perm[b], perm[a]
        k += size
    if host is not L:
        L = host.to(ld.device)
    index = dict(dtype=torch.long, device=L.device)
    t = torch.tensor(pairs, **index)
    sub = L.new_zeros(n)  # D's subdiagonal: on the 2×2 blocks only (L's entries elsewhere)
    if pairs:
        sub[t] = e[t]
        L[t + 1, t] = 0.0
    L.diagonal().fill_(1.0)
    perm_t = torch.tensor(perm, **index)
    return ExplicitLDL(L, perm_t, torch.argsort(perm_t), d, sub, t, eigenvalues)
