"""The inertia of a symmetric matrix (a leaf: factorizations and operators both report it)."""

from __future__ import annotations

from typing import NamedTuple


class Inertia(NamedTuple):
    """Counts of positive, negative and zero eigenvalues of a symmetric matrix."""

    positive: int
    negative: int
    zero: int


__all__ = ["Inertia"]
