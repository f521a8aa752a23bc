"""Factor ``H + εI``: the Riccati recursion, or the KKT fallback where a stage is singular."""

from __future__ import annotations

from typing import Sequence

from ..blocks.protocol import Oracle
from .algebra import StageSingular
from .kkt import KKTFactorization
from .prepare import prepare_stages
from .riccati import RiccatiFactorization


def factorize(oracles: Sequence[Oracle], loss: Oracle, damping: float, stages: Sequence | None = None):
    """Factor ``H + εI``: the Riccati recursion, or the pivoted KKT factorization when a
    stage is singular. Raises :class:`~tallskinny.SingularSystemError` when ``H + εI`` is singular.
    ``stages`` are the prepared stages (:func:`~tallskinny.elimination.prepare.prepare_stages`) if already at hand."""
    try:
        return RiccatiFactorization(stages if stages is not None else prepare_stages(oracles, loss), loss, damping)
    except StageSingular:
        return KKTFactorization(oracles, loss, damping)
