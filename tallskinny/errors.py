"""Errors raised by :mod:`tallskinny` (beyond plain ``TypeError``/``ValueError``)."""

from __future__ import annotations

import math
import numbers

import torch

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


class StaleCurvatureError(RuntimeError):
    """A tensor a :class:`~tallskinny.Curvature` was computed from changed in place after
    the curvature was made (``with torch.no_grad(): p.add_(…)``, an optimizer step).

    The curvature shares memory with the parameters, so its products would mix old and
    new values; every method of the curvature and of its factorizations raises this
    instead. Carries ``parameter``, the name of the first changed parameter
    (``"<block index>.<name in the module>"``, as in ``chain.layout().names``; frozen
    parameters are watched too). Call ``chain.curvature(...)`` again at the new values.
    """

    def __init__(self, message: str, *, parameter: str):
        super().__init__(message)
        self.parameter = parameter


class NondeterministicModuleError(ValueError):
    """A module of a chain is random where the call evaluates it: a dropout module in
    training mode, or a ``torch.func`` fallback module whose two evaluations at the same
    input differed. A random map has no derivatives to compute (each evaluation draws a
    new function); call ``.eval()`` on the module (dropout is the identity in eval mode).
    """


class ResourceError(MemoryError):
    """A computation would need more memory than the limit: refused before any work.

    ``estimate`` is the estimated peak of the new allocations (bytes, an upper bound
    within about 2×: :mod:`tallskinny.resources`), ``limit`` the limit it was checked
    against (bytes: ``memory_limit=`` or the available memory) and ``largest`` the part
    of the estimate that dominates, in words. The message also says what would fit (a
    smaller batch, ``kind="ggn"``, a damping ``> 0``) and how to override the limit.
    A subclass of :class:`MemoryError`.
    """

    def __init__(self, message: str, *, estimate: int, limit: float, largest: str):
        super().__init__(message)
        self.estimate = estimate
        self.limit = limit
        self.largest = largest


class ConvergenceWarning(AccuracyWarning):
    """An iterative solve (the ``krylov`` route) stopped at ``maxiter`` (or on a
    breakdown) before its residual reached ``rtol``. The iterate is returned; the
    factorization's ``info`` (:class:`tallskinny.routes.KrylovInfo`) says the residual it
    reached. A subclass of :class:`AccuracyWarning`."""


class ConvergenceError(RuntimeError):
    """An iterative search ended without the accuracy it promises and had no exact
    fallback: ``Curvature.eigvalsh`` where block shift-invert Lanczos did not converge
    on a model above ``spectrum.DENSE_FALLBACK_MAX_P`` parameters (smaller ones take a
    dense ``eigh``). A subclass of :class:`RuntimeError`."""


class UnsupportedOnRouteError(NotImplementedError):
    """A quantity the route a curvature takes cannot give: ``logdet()``, ``sign()`` and
    ``inertia()`` on the ``krylov`` route (an iterative solve has no factors). Carries
    ``route`` and ``operation``. Take an exact route (``method="auto"``) for them."""

    def __init__(self, message: str, *, route: str, operation: str):
        super().__init__(message)
        self.route = route
        self.operation = operation


def real_number(value, name: str) -> float:
    """``value`` as a finite ``float`` (a Python real or a 0-d floating tensor), else a
    ``TypeError`` / ``ValueError`` naming ``name``: the check of every scalar argument."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype.is_floating_point:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
