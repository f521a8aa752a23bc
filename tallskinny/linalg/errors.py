"""Errors raised by :mod:`tallskinny.linalg`."""

from __future__ import annotations

import torch


class SingularMatrixError(torch.linalg.LinAlgError, ValueError):
    """The matrix is singular to working precision; no solution is returned.

    A subclass of both :class:`torch.linalg.LinAlgError` and :class:`ValueError`, so
    either ``except`` clause catches it. ``block`` is the index of the (block) pivot at
    which the factorization broke down, or ``None`` where that is not meaningful.
    """

    def __init__(self, message: str, *, block: int | None = None):
        super().__init__(message)
        self.block = block
