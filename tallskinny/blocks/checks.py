"""Validation helpers shared by blocks (public, for plugin authors): every check runs before any derivative is computed."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..linalg import Zero


def describe(x) -> str:
    """A short description of ``x`` for error messages."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}"
    return f"an object of type {type(x).__name__}"


def check_input(z, where: str) -> Tensor:
    """``z`` must be a floating-point tensor."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{where}: the input z must be a torch.Tensor, got {describe(z)}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"{where}: the input z must be floating-point, got dtype {z.dtype}")
    return z


_TRUSTED = contextvars.ContextVar("tallskinny_checks_trusted", default=False)


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Within this context :func:`check_finite` and :func:`check_params` trust their
    arguments: the caller has validated them already (``Chain.curvature`` checks its own
    parameters once and every activation and adjoint of the pass in one reduction, instead
    of one device synchronisation per block). Shape checks still run."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_finite(t: Tensor, name: str, where: str) -> None:
    """No NaN or inf in ``t`` (the oracle of a non-finite point is meaningless)."""
    if _TRUSTED.get():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {name} contains NaN or inf; derivatives at a non-finite point are undefined")


def check_derivatives_finite(t: Tensor, name: str, where: str) -> None:
    """No NaN or inf in derivatives a block computed itself (the ``torch.func`` fallback's
    Jacobians and Hessians): checked even within :func:`trusted`, which vouches for a
    block's inputs, not for what the block's own differentiation makes of them."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {name} contains NaN or inf; the function is not twice differentiable at this point")


def check_params(expected: Sequence[Tensor], params, z: Tensor, where: str) -> list[Tensor]:
    """``params`` must be a sequence of tensors shaped like ``expected``, with ``z``'s dtype and device."""
    if _TRUSTED.get():
        return list(params)
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(
            f"{where}: params must be a sequence (list or tuple) of tensors, one per parameter, "
            f"got {describe(params)}"
        )
    params = list(params)
    if len(params) != len(expected):
        raise ValueError(f"{where}: expected {len(expected)} parameter tensors, got {len(params)}")
    for i, (value, ref) in enumerate(zip(params, expected)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: parameter {i} must be a tensor, got {describe(value)}")
        if value.shape != ref.shape:
            raise ValueError(
                f"{where}: parameter {i} must have shape {tuple(ref.shape)}, got {tuple(value.shape)}"
            )
        if value.dtype != z.dtype or value.device != z.device:
            raise TypeError(
                f"{where}: parameter {i} has dtype {value.dtype} on {value.device}, but the input z has "
                f"dtype {z.dtype} on {z.device}; they must agree"
            )
    return params


def check_adjoint(g, out_shape: torch.Size, z: Tensor, where: str) -> Tensor:
    """``g`` must be a tensor of the output's shape with ``z``'s dtype and device, and finite."""
    if not isinstance(g, Tensor):
        raise TypeError(f"{where}: g (= ∂loss/∂z_out) must be a tensor, got {describe(g)}")
    if g.shape != out_shape:
        raise ValueError(
            f"{where}: g (= ∂loss/∂z_out) must have the shape of the output {tuple(out_shape)}, "
            f"got {tuple(g.shape)}"
        )
    if g.dtype != z.dtype or g.device != z.device:
        raise TypeError(
            f"{where}: g has dtype {g.dtype} on {g.device}, but the input z has dtype {z.dtype} on "
            f"{z.device}; they must agree"
        )
    check_finite(g, "g", where)
    return g


def plain(t: Tensor) -> Tensor:
    """``t`` without autograd history: ``t`` itself if it does not require grad (no new
    tensor object), else ``t.detach()``."""
    return t.detach() if t.requires_grad else t


def zero(m: int, n: int, like: Tensor) -> Zero:
    """The ``m × n`` zero operator with the dtype and device of ``like`` (operators are
    immutable: one object per shape is shared)."""
    return _zero(m, n, like.dtype, like.device)


@functools.lru_cache(maxsize=1024)
def _zero(m: int, n: int, dtype: torch.dtype, device: torch.device) -> Zero:
    return Zero(m, n, dtype=dtype, device=device)
