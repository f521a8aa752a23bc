"""Stages of blocks without parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from ...blocks.protocol import Oracle
from ...linalg import Diagonal, ScaledIdentity, Zero
from ..algebra import congruence, plus, symmetrize, zero_map
from ..compiled import CompiledOracle
from ..supported import Supported
from . import Stage


class ActivationStage(Stage):
    """A block without parameters: ``S ← E + FᵀSF``, ``t ← Fᵀt``, ``y ← F y``."""

    p = 0

    def __init__(self, oracle: Oracle, compiled=None):
        self.F, self.E = oracle.F, oracle.E
        self.FT = oracle.F.T
        # the sweeps' products y ↦ F y, t ↦ Fᵀ t as plain tensor functions (made on first use)
        self._compiled = compiled if compiled is not None else CompiledOracle(oracle)
        self.diagonal = isinstance(self.F, (Diagonal, ScaledIdentity)) and isinstance(self.E, (Diagonal, Zero))
        # F = diag(d), a small: FᵀSF + E = S ⊙ ddᵀ + E is one addcmul with ddᵀ and E formed
        # once (for large a, forming E densely costs more than adding its diagonal)
        self._dd = self._E = None
        if isinstance(self.F, Diagonal) and isinstance(self.E, (Diagonal, Zero)) and self.F.shape[0] <= 128:
            d = self.F.diagonal
            self._dd = torch.outer(d, d)  # d_i·d_j = d_j·d_i: symmetric exactly
            self._E = torch.diag(self.E.diagonal) if isinstance(self.E, Diagonal) else None

    @property
    def F_apply(self):
        return self._compiled.F or zero_map

    @property
    def FT_apply(self):
        return self._compiled.FT or zero_map

    @property
    def takes_supported(self) -> bool:
        """``diag(d) S diag(d)`` keeps the support of ``S`` where ``E = 0`` (a ReLU)."""
        return isinstance(self.F, Diagonal) and isinstance(self.E, Zero)

    def eliminate(self, S: Tensor | Supported, damping: float, index: int):
        if isinstance(S, Supported):  # S ⊙ ddᵀ on the block: s_ij·(d_i·d_j), symmetric exactly
            d = self.F.diagonal.index_select(0, S.index)
            return Supported(S.values * torch.outer(d, d), S.index, S.n), None
        if self._dd is not None:
            return (S * self._dd if self._E is None else torch.addcmul(self._E, S, self._dd)), None
        S_new = plus(self.E, congruence(self.F, S))
        # D S D (+ a diagonal) of a symmetric S is symmetric bit for bit: s_ij·d_i·d_j
        return (S_new if self.diagonal else symmetrize(S_new)), None


class NoParameters(ActivationStage):
    """A reduced stage with no parameters left (all inputs zero): ``S ← E + FᵀSF``."""

    def eliminate(self, S: Tensor, damping: float, index: int):
        return super().eliminate(S, damping, index)[0], None
