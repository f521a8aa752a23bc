"""The placeholder stage of blocks inside a run (the run's first block eliminates them)."""

from __future__ import annotations

from torch import Tensor

from . import Stage


class CoveredStage(Stage):
    """A block inside a run: the run's stage (at the run's first block) eliminates it."""

    p = 0

    def eliminate(self, S: Tensor, damping: float, index: int):
        return S, None


COVERED = CoveredStage()
