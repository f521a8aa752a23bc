"""Factor ``H + εI``: the Riccati recursion, or the KKT fallback where a stage is singular."""

from __future__ import annotations

from typing import Sequence

from ..blocks.protocol import Oracle
from ..errors import SingularSystemError
from .algebra import StageSingular
from .kkt import KKTFactorization
from .prepare import prepare_stages
from .riccati import RiccatiFactorization


def factorize(oracles: Sequence[Oracle], loss: Oracle, damping: float, stages: Sequence | None = None, *,
              confirm_singular: bool = True):
    """Factor ``H + εI``: the Riccati recursion, or the pivoted KKT factorization when a
    stage is singular. Raises :class:`~tallskinny.SingularSystemError` when ``H + εI`` is singular.
    ``stages`` are the prepared stages (:func:`~tallskinny.elimination.prepare.prepare_stages`) if already at hand.
    ``confirm_singular=False``: a singular stage raises at once, unconfirmed (``H + εI`` may
    be regular), without the KKT factorization."""
    try:
        return RiccatiFactorization(stages if stages is not None else prepare_stages(oracles, loss), loss, damping)
    except StageSingular as breakdown:
        if not confirm_singular:
            raise SingularSystemError(
                f"the elimination of H + εI broke down at block {breakdown.stage} of the chain at "
                f"damping={damping:g} (not confirmed: confirm_singular=False)",
                damping=damping,
                stage=breakdown.stage,
            ) from None
        return KKTFactorization(oracles, loss, damping)
