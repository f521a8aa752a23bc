"""Errors raised by :mod:`tallskinny` (beyond plain ``TypeError``/``ValueError``)."""

from __future__ import annotations

from .linalg.errors import SingularMatrixError


class SingularSystemError(SingularMatrixError):
    """``H + εI`` is singular (to working precision) at the requested damping.

    Carries ``damping`` (the ε used) and ``stage`` (the index of the block of the chain
    at which the elimination found the system singular, or ``None``). A subclass of
    :class:`tallskinny.linalg.SingularMatrixError`, hence of
    :class:`torch.linalg.LinAlgError` and :class:`ValueError`.
    """

    def __init__(self, message: str, *, damping: float, stage: int | None = None):
        super().__init__(message, block=stage)
        self.damping = damping
        self.stage = stage


class AccuracyWarning(UserWarning):
    """A solution's estimated backward error stayed above tolerance after the automatic
    refinements (``Factorization.solve``): ``H + εI`` is too ill-conditioned for the
    elimination at this damping. The solution is returned; its error may exceed
    ``eps·cond``. A larger damping, or more ``refine`` steps, usually help."""
