"""The ``torch.func`` fallback for any module or loss (the ``Block`` base class that uses it
is in :mod:`tallskinny.blocks.base`).

The fallback differentiates the flat map ``x = (θ, z_in) ↦ z_out`` with
``torch.func``: one Jacobian gives ``[G F]``, and the Hessian of the scalar
``⟨g, f(θ, z_in)⟩`` (reverse-over-reverse, see :func:`second_derivatives`) gives
``[[A C], [Cᵀ E]]``. It is exact (up to rounding) for any
module that maps one tensor to one tensor, also when samples interact, but it forms
dense matrices of size ``a_out × (p + a_in)`` and ``(p + a_in)²``: analytic blocks
(:mod:`.linear`, :mod:`.elementwise`, …) write the hooks of :meth:`Block.oracle`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd, jacrev

from ..linalg import Dense
from .checks import check_derivatives_finite, check_finite, check_input, describe, zero
from .protocol import Oracle

__all__ = ["FuncLoss", "differ", "func_oracle", "func_oracle_bytes", "second_derivatives"]


def func_oracle(
    forward: Callable[[Tensor, Sequence[Tensor]], Tensor],
    z: Tensor,
    params: Sequence[Tensor],
    g: Tensor,
    *,
    second_order: bool = True,
    where: str = "func_oracle",
) -> Oracle:
    """The oracle of ``forward(z, params)`` by ``torch.func``, all fields dense.

    With ``x = (θ, vec z)``: ``[G F] = ∂ vec f/∂x`` and, if ``second_order``,
    ``[[A C], [Cᵀ E]] = ∂²⟨g, f⟩/∂x²``. The inputs must already be validated.
    """
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    p = sum(sizes)
    a_in, a_out = z.numel(), g.numel()
    theta0 = torch.cat([q.reshape(-1) for q in params]) if params else z.new_zeros(0)
    x0 = torch.cat([theta0, z.reshape(-1)])
    g_flat = g.reshape(-1)

    def flat_forward(x: Tensor) -> Tensor:
        theta, z_flat = x[:p], x[p:]
        values = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes)]
        # the clone lets in-place modules (inplace=True) run under the transforms
        return forward(z_flat.reshape(z.shape).clone(), values).reshape(-1)

    def contracted(x: Tensor) -> Tensor:
        return torch.dot(g_flat, flat_forward(x))

    try:
        jacobian = _jacobian(flat_forward, x0, forward_mode=a_out > p + a_in)
        hess = second_derivatives(contracted, x0) if second_order else None
    except RuntimeError as err:
        raise RuntimeError(
            f"{where}: the torch.func fallback could not differentiate the module ({err}). "
            "The fallback needs a deterministic module mapping one tensor to one tensor "
            "(call .eval() for dropout); otherwise register an analytic block with "
            "tallskinny.blocks.register"
        ) from err
    check_derivatives_finite(jacobian, "∂z_out/∂(θ, z_in)", where)
    G = Dense(jacobian[:, :p].contiguous()) if p else zero(a_out, 0, z)
    F = Dense(jacobian[:, p:].contiguous())
    if not second_order:
        return Oracle(G=G, F=F, A=zero(p, p, z), C=zero(p, a_in, z), E=zero(a_in, a_in, z))
    check_derivatives_finite(hess, "∂²⟨g, z_out⟩/∂(θ, z_in)²", where)
    hess = 0.5 * (hess + hess.mT)
    A = Dense(hess[:p, :p].contiguous(), symmetric=True) if p else zero(0, 0, z)
    C = Dense(hess[:p, p:].contiguous()) if p else zero(0, a_in, z)
    E = Dense(hess[p:, p:].contiguous(), symmetric=True)
    return Oracle(G=G, F=F, A=A, C=C, E=E)


def func_oracle_bytes(a_in: int, a_out: int, p: int, *, second_order: bool, itemsize: int) -> tuple[int, int]:
    """``(kept, scratch)`` of :func:`func_oracle`, with ``n = p + a_in``: it keeps ``G``, ``F``
    (``a_out·n``) and, with ``second_order``, ``A``, ``C``, ``E`` (``n²``); the Jacobian needs
    its vmap's basis (``a_out²``, or ``n²`` in forward mode) and ``2·a_out·n`` besides, the
    Hessian ``3n² + a_out·n`` (its basis, the result, the symmetrised copy)."""
    n = p + a_in
    basis = n * n if a_out > n else a_out * a_out  # forward mode where a_out > n
    kept = a_out * n + (n * n if second_order else 0)
    scratch = max(basis + 2 * a_out * n, 3 * n * n + a_out * n if second_order else 0)
    return kept * itemsize, scratch * itemsize


def _jacobian(fn: Callable[[Tensor], Tensor], x0: Tensor, *, forward_mode: bool) -> Tensor:
    """``∂fn/∂x`` at ``x0``. Reverse mode costs one pass per output, forward mode one per
    input: ``forward_mode`` picks the cheaper; an op without a forward-mode rule falls
    back to reverse mode."""
    if forward_mode:
        try:
            return jacfwd(fn)(x0)
        except (RuntimeError, NotImplementedError):
            pass
    return jacrev(fn)(x0)


def second_derivatives(fn: Callable[[Tensor], Tensor], x0: Tensor) -> Tensor:
    """The Hessian of the scalar ``fn`` at ``x0``, reverse-over-reverse: ``jacrev(grad(fn))``.

    Not ``torch.func.hessian`` (``jacfwd(jacrev)``) nor ``jacrev(jacrev)``: in torch 2.13
    both return silently wrong second derivatives for batch, layer and instance norm
    (errors of order 1; for batch norm this is pytorch/pytorch#196699), while
    ``jacrev(grad)`` agrees with plain autograd double-backward to rounding. The tests
    pin this down.
    """
    return jacrev(grad(fn))(x0)


class FuncLoss:
    """A loss block for any callable ``loss(z, target) -> scalar``, by ``torch.func``.

    ``F`` is the gradient of the loss w.r.t. ``z`` as a ``1 × a_in`` row and ``E`` its
    Hessian (dense); ``G``, ``A``, ``C`` are empty (a loss has no parameters here:
    tensors the callable holds are constants).
    """

    def __init__(self, loss: Callable[[Tensor, Any], Tensor]):
        if not callable(loss):
            raise TypeError(f"FuncLoss needs a callable loss(z, target) -> scalar, got {describe(loss)}")
        self.loss = loss

    def forward(self, z: Tensor, target: Any) -> Tensor:
        """``loss(z, target)``, checked to be a scalar."""
        check_input(z, self._where("forward"))
        return self._scalar(self.loss(z, target), "forward")

    def check_target(self, z: Tensor, target: Any) -> None:
        """Evaluates the loss once at ``z.detach()``; an error there, or a non-scalar
        value, raises ``ValueError``/``TypeError`` naming the target."""
        where = self._where("check_target")
        check_input(z, where)
        try:
            with torch.no_grad():
                value = self.loss(z.detach(), target)
        except (RuntimeError, IndexError, ValueError) as err:
            raise ValueError(
                f"{where}: the loss cannot take the target {describe(target)} with z of shape "
                f"{tuple(z.shape)}: {err}"
            ) from err
        self._scalar(value, "check_target")

    def oracle(self, z: Tensor, target: Any) -> Oracle:
        """``F = ∂loss/∂z`` (a row) and ``E = ∂²loss/∂z²``."""
        where = self._where("oracle")
        check_input(z, where)
        z = z.detach()
        check_finite(z, "z", where)
        self.check_target(z, target)
        shape = z.shape

        def flat_loss(z_flat: Tensor) -> Tensor:
            return self.loss(z_flat.reshape(shape), target)

        x0 = z.reshape(-1)
        try:
            gradient = grad(flat_loss)(x0)
            hess = second_derivatives(flat_loss, x0)
        except RuntimeError as err:
            raise RuntimeError(f"{where}: the torch.func fallback could not differentiate the loss ({err})") from err
        check_derivatives_finite(gradient, "the gradient of the loss", where)
        check_derivatives_finite(hess, "the Hessian of the loss", where)
        a_in = z.numel()
        return Oracle(
            G=zero(1, 0, z),
            F=Dense(gradient.reshape(1, a_in)),
            A=zero(0, 0, z),
            C=zero(0, a_in, z),
            E=Dense(0.5 * (hess + hess.mT), symmetric=True),
        )

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """The Hessian ``a × a`` of the loss and the gradient, kept; the Hessian's basis,
        the result and its symmetrised copy (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        a = math.prod(z_in)
        return (a * a + a) * itemsize, 3 * a * a * itemsize

    def _scalar(self, value, method: str) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() != 0 or not value.dtype.is_floating_point:
            raise TypeError(
                f"{self._where(method)}: the loss must return a floating-point scalar (0-dim tensor), "
                f"got {describe(value)}; use reduction='mean' or 'sum'"
            )
        return value

    def _where(self, method: str) -> str:
        return f"FuncLoss({_callable_name(self.loss)}).{method}"

    def __repr__(self) -> str:
        return f"FuncLoss({self.loss!r})"


def _callable_name(f) -> str:
    if isinstance(f, nn.Module):
        return f._get_name()
    return getattr(f, "__qualname__", None) or type(f).__name__


def differ(a: Tensor, b: Tensor) -> bool:
    """Whether two evaluations ``a``, ``b`` of one map at one point differ by more than
    rounding: ``max |a − b| > √eps · max |a|`` (a tolerance, not bitwise equality, so that
    kernels with a nondeterministic summation order are not mistaken for random ones)."""
    if a.shape != b.shape:
        return True
    if a.numel() == 0:
        return False
    if not a.dtype.is_floating_point:
        return not torch.equal(a, b)
    tol = math.sqrt(torch.finfo(a.dtype).eps) * float(a.abs().max())
    return bool((a - b).abs().max() > tol)
