"""Recycled buffers for the large internal tensors of factorizations and checks.

glibc gives a freed block of more than about 128 KiB (up to 32 MiB as its threshold
adapts) back to the kernel, and the next allocation of that size pays a page fault per
4 KiB page when it is first written; an ``inverse_hvp`` makes its factors, check buffer
and batched-HVP weights as fresh multi-MiB tensors at every call.

``empty(shape, like)`` returns a buffer of that shape from a small pool, or a new one;
``recycle(owner, *tensors)`` hands the tensors to the pool once ``owner`` (a library
object that holds them and never gives them to the caller: a run's factors, a
factorization's check buffer) is garbage; ``give(t)`` at once, for a temporary whose
last use has passed (a stage's scratch products, the value Hessian ``S`` a stage has
consumed). A buffer is in the pool only after its owner is gone or its last use, so no
two live objects share one. The pool holds CPU tensors only (CUDA has its own
caching allocator), of at least ``MIN_BYTES`` each and ``LIMIT_BYTES`` in all; a
buffer that does not fit is simply freed.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

#: Buffers smaller than this come from malloc's free lists anyway: not pooled.
MIN_BYTES = 128 * 1024
#: The most the pool holds (the buffers of about two factorizations of a 64-layer width-64 MLP).
LIMIT_BYTES = 64 * 1024 * 1024

_lock = threading.Lock()
_free: dict[tuple, list[Tensor]] = {}
_held = 0


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _poolable(t: Tensor) -> bool:
    return (
        _nbytes(t) >= MIN_BYTES
        and t.device.type == "cpu"
        and t._base is None
        and not t.requires_grad
        and t.grad_fn is None
        and t.is_contiguous()
    )


def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device."""
    shape = tuple(shape)
    if like.device.type == "cpu" and math.prod(shape) * like.element_size() >= MIN_BYTES:
        global _held
        with _lock:
            stack = _free.get((shape, like.dtype))
            if stack:
                t = stack.pop()
                _held -= _nbytes(t)
                return t
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def recycle(owner: object, *tensors: Tensor) -> None:
    """Give ``tensors`` (whole, contiguous buffers only ``owner`` uses) to the pool when
    ``owner`` is collected."""
    buffers = tuple(t for t in tensors if t is not None and _poolable(t))
    if buffers:
        weakref.finalize(owner, _put, buffers)


def give(t: Tensor) -> None:
    """Put ``t`` in the pool now: the caller holds the only reference that will ever be
    used again (it must not read or write ``t`` afterwards)."""
    if _poolable(t):
        _put((t,))


def _put(buffers: tuple[Tensor, ...]) -> None:
    global _held
    with _lock:
        for t in buffers:
            n = _nbytes(t)
            if _held + n > LIMIT_BYTES:
                continue
            _free.setdefault((tuple(t.shape), t.dtype), []).append(t)
            _held += n


def clear() -> None:
    """Free every pooled buffer."""
    global _held
    with _lock:
        _free.clear()
        _held = 0
