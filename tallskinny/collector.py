"""Python's cyclic garbage collector paused while a curvature call runs.

A call builds thousands of short-lived Python objects per hundred layers (operators,
stage records, the tensors of the factors). They are freed by reference counting, but
while the call runs they count as allocations for the cyclic collector, survive its
young-generation passes and are promoted; every few calls that triggers a full
collection, which walks every object of the interpreter (torch alone holds ~10⁵): tens
of milliseconds, as much as the call itself on a 64-layer chain, and growing with the
chain's depth faster than linearly. The calls create no reference cycles of their own,
so pausing the collector for their duration loses nothing; it is re-enabled on the way
out (also on error) and left alone when the caller had disabled it.
"""

from __future__ import annotations

import functools
import gc
from typing import Callable, TypeVar

__all__ = ["collector_paused"]

F = TypeVar("F", bound=Callable)


def collector_paused(fn: F) -> F:
    """Decorator: run ``fn`` with ``gc`` disabled (no-op if it already is)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper  # type: ignore[return-value]
