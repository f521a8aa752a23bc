"""Wall-clock timing for the benchmarks: medians after a warm-up, with device synchronisation.

On CUDA, kernels run asynchronously: ``sync`` (``torch.cuda.synchronize``) is called before
the clock starts and before it stops, so a time covers the work and not just its launch.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for every queued kernel on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], T], sync: Callable[[], None] = lambda: None) -> tuple[T, float]:
    """``(fn(), seconds)`` for one call."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def median_time(
    fn: Callable[[], object], repeats: int, *, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, sync)[1] for _ in range(repeats))


def paired_times(
    fns: Sequence[Callable[[], object]], repeats: int, *, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> list[list[float]]:
    """Seconds of ``repeats`` rounds in which every ``fn`` runs once, one after the other.

    On a shared machine the load drifts: timing two functions in interleaved rounds and
    taking the median of their per-round ratio compares them under the same load, where
    separate medians can be minutes apart. Returns one list of times per function."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            out.append(timed(fn, sync)[1])
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of the per-round ratios of two :func:`paired_times` series."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
