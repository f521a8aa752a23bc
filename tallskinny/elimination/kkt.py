"""The pivoted fallback: the block-tridiagonal KKT system of the control problem."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..blocks.protocol import Oracle
from ..errors import SingularSystemError
from ..linalg import Inertia, SingularMatrixError, SymmetricBlockTridiagonal
from .algebra import symmetrize


class KKTFactorization:
    """``H + εI`` through the symmetric block-tridiagonal KKT system of the control problem.

    Stage ``l`` holds the variables ``(θ_l, y_l, λ_l)``; its diagonal block is
    ``[[A_l + εI, 0, G_lᵀ], [0, E_{l+1}, −I], [G_l, −I, 0]]`` (``E_{L+1} = E_loss``) and
    its coupling to stage ``l+1`` is ``C_{l+1}`` (row ``θ_{l+1}``) and ``F_{l+1}``
    (row ``λ_{l+1}``) in column ``y_l``. With ``m = Σ_l a_l`` multipliers,
    ``inertia(KKT) = inertia(H + εI) + (m, m, 0)`` and ``|det KKT| = |det(H + εI)|``.

    The oracles of a float32 chain are factored in float64 (they are exact there): the
    pivoted fallback's singularity verdict then means that the float32 problem is
    singular, not that a pivot fell below float32's rounding level.
    """

    def __init__(self, oracles: Sequence[Oracle], loss: Oracle, damping: float):
        self.damping = damping
        n = len(oracles)
        self._p = [o.G.shape[1] for o in oracles]
        self._a = [o.F.shape[0] for o in oracles]
        self._dtype = loss.E.dtype
        work = torch.float64 if self._dtype == torch.float32 else self._dtype
        ref = loss.E.to_dense().to(work)
        diagonal, lower = [], []
        for i, o in enumerate(oracles):
            p, a = self._p[i], self._a[i]
            E_next = (oracles[i + 1].E if i + 1 < n else loss.E).to_dense().to(work)
            D = ref.new_zeros((p + 2 * a, p + 2 * a))
            D[:p, :p] = o.A.to_dense().to(work) + damping * torch.eye(p, dtype=ref.dtype, device=ref.device)
            G = o.G.to_dense().to(work)
            D[:p, p + a:] = G.mT
            D[p + a:, :p] = G
            D[p:p + a, p:p + a] = E_next
            eye = torch.eye(a, dtype=ref.dtype, device=ref.device)
            D[p:p + a, p + a:] = -eye
            D[p + a:, p:p + a] = -eye
            # (symmetric to the oracles' rounding, which float64 sees in a float32 chain's)
            diagonal.append(symmetrize(D) if work != self._dtype else D)
            if i + 1 < n:
                nxt = oracles[i + 1]
                pn, an = self._p[i + 1], self._a[i + 1]
                Lb = ref.new_zeros((pn + 2 * an, p + 2 * a))
                Lb[:pn, p:p + a] = nxt.C.to_dense().to(work)
                Lb[pn + an:, p:p + a] = nxt.F.to_dense().to(work)
                lower.append(Lb)
        self._m = sum(self._a)
        try:
            self._factor = SymmetricBlockTridiagonal(diagonal, lower).factorize()
        except SingularMatrixError as err:
            stage = err.block
            raise SingularSystemError(
                f"H + εI is singular at damping={damping:g}"
                + (f" (the elimination broke down at block {stage} of the chain)" if stage is not None else ""),
                damping=damping,
                stage=stage,
            ) from None
        k = self._factor.inertia()
        self._inertia = Inertia(k.positive - self._m, k.negative - self._m, k.zero)
        self.norm_lower_bound = 0.0

    def solve(self, b: Tensor) -> Tensor:
        rhs = []
        work = b.to(self._factor.dtype)
        for bl, p, a in zip(torch.split(work, self._p, dim=0), self._p, self._a):
            rhs.append(bl)
            rhs.append(work.new_zeros((2 * a, b.shape[1])))
        x = self._factor.solve(torch.cat(rhs, dim=0))
        out, pos = [], 0
        for p, a in zip(self._p, self._a):
            out.append(x[pos:pos + p])
            pos += p + 2 * a
        return torch.cat(out, dim=0).to(b.dtype)

    def logdet(self) -> Tensor:
        return self._factor.logdet().to(self._dtype)

    def sign(self) -> Tensor:
        return self.logdet().new_tensor(-1.0 if self._inertia.negative % 2 else 1.0)

    def inertia(self) -> Inertia:
        return self._inertia


def kkt_bytes(oracles: Sequence[Oracle]) -> int:
    """The bytes of the dense blocks :class:`KKTFactorization` forms: a diagonal block of
    size ``p_l + 2a_l``, its factors and a coupling block per block of the chain."""
    n = [o.G.shape[1] + 2 * o.F.shape[0] for o in oracles]
    itemsize = oracles[0].F.dtype.itemsize if oracles else 8
    return itemsize * sum(3 * k * k + k * m for k, m in zip(n, n[1:] + [0]))
