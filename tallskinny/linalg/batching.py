"""Equal-shape batches: many small blocks reduced in one torch call, large ones alone."""

from __future__ import annotations

import math
from typing import Sequence

STACK_ENTRIES = 1 << 20
"""A batch stacks at most this many entries (8 MiB of float64): stacking copies, and for
large blocks the copy costs more than the torch calls it saves."""


def same_shape_batches(shapes: Sequence[tuple[int, ...]], limit: int = STACK_ENTRIES) -> list[list[int]]:
    """The indices of ``shapes`` grouped by shape, each group cut into runs of at most
    ``limit`` entries in all (at least one index a run); empty shapes are left out."""
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    for i, shape in enumerate(shapes):
        entries = math.prod(shape)
        if not entries:
            continue
        runs = groups.setdefault(tuple(shape), [[]])
        if runs[-1] and (len(runs[-1]) + 1) * entries > limit:
            runs.append([])
        runs[-1].append(i)
    return [run for runs in groups.values() for run in runs]
