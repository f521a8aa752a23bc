"""The float32 elimination of a float64 problem: the fast half of a mixed-precision solve.

LAPACK's ``dsgesv`` idea: factor ``H + εI`` in float32 and refine in float64. The oracles
are cast to float32 once per curvature (:meth:`~tallskinny.blocks.protocol.Oracle.astype`,
structure kept), prepared as float32 stages and eliminated by the Riccati recursion in
float32. Its solve maps a float64 right-hand side to float32 and back: an approximate
inverse ``M⁻¹`` with ``‖I − M⁻¹(H+εI)‖ ≲ cond(H+εI)·eps₃₂``, the preconditioner of the
caller's float64 refinement (GMRES on ``(H+εI)M⁻¹`` with exact float64 HVPs,
:class:`tallskinny.curvature.Factorization`), which drives the solution to float64's
backward error where that contraction is below one and often where it is not.

It gives no ``log|det|`` or inertia: those are read from a float64 factorization.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..blocks.protocol import Oracle
from ..linalg.factor import pivot_precision
from .algebra import StageSingular
from .compiled import compile_oracles
from .prepare import prepare_stages
from .riccati import RiccatiFactorization

LOW = torch.float32
"""The precision of the mixed factorization's factors."""

MIN_STAGE = 1024
"""``precision="auto"`` factors in float32 where the largest activation ``a`` of a block
(the batch included: the state of the recursion, whose ``O(a³)`` algebra dominates the
factorization) has at least this many entries; below, the refinement's HVPs and sweeps
outweigh the float32 factorization's gain (CHANGELOG, issue 18)."""


def pays(oracles: Sequence[Oracle]) -> bool:
    """Whether the float32 factorization is expected to pay (:data:`MIN_STAGE`)."""
    return max((o.sizes[1] for o in oracles), default=0) >= MIN_STAGE


class LowPrecisionStages:
    """The float32 copies of a curvature's oracles and their prepared stages (made once)."""

    def __init__(self, oracles: Sequence[Oracle], loss: Oracle):
        self.oracles = [o.astype(LOW) for o in oracles]
        self.loss = loss.astype(LOW)
        self._stages = None

    def factorize(self, damping: float) -> "LowPrecisionFactorization | None":
        """The float32 elimination at ``damping``, or ``None`` where a stage is singular to
        float64's working precision (:func:`~tallskinny.linalg.factor.pivot_precision`) or
        overflows: the caller factors in float64."""
        if self._stages is None:
            self._stages = prepare_stages(self.oracles, self.loss, compile_oracles(self.oracles))
        try:
            with pivot_precision(torch.float64):
                return LowPrecisionFactorization(RiccatiFactorization(self._stages, self.loss, damping))
        except (StageSingular, RuntimeError):
            return None


class LowPrecisionFactorization:
    """A float32 :class:`~tallskinny.elimination.riccati.RiccatiFactorization` that solves
    right-hand sides of any dtype (in float32, the result cast back)."""

    def __init__(self, inner: RiccatiFactorization):
        self._inner = inner
        self.damping = inner.damping
        self.norm_lower_bound = float(inner.norm_lower_bound)

    def solve(self, b: Tensor) -> Tensor:
        return self._inner.solve(b.to(LOW)).to(b.dtype)
