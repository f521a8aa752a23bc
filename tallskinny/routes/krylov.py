"""The ``krylov`` route: iterative solves over the whole data, preconditioned by the exact
factorization of one sub-batch. Inexact by nature and never chosen by ``method="auto"``.

* ``kind="ggn"``: preconditioned conjugate gradients (``G + εI`` is positive definite
  for ``ε > 0``);
* ``kind="hessian"``: preconditioned MINRES (``H + εI`` is symmetric, often indefinite).

Both run column-parallel on ``(P, k)`` right-hand sides, hold their vectors in float64
whatever the model's dtype (the products are taken in the model's dtype), and stop a
column when its residual ``‖b − (M + εI)x‖₂ ≤ rtol·‖b‖₂`` (the 2-norm, with or without a
preconditioner). At the end the true residual is computed with one more product; where
the recursive residual drifted from it, the solve restarts from the true residual within
the remaining ``maxiter``. :class:`KrylovInfo` reports the products and the residual
reached; a solve that did not reach ``rtol`` warns (:class:`~tallskinny.errors.ConvergenceWarning`).

The preconditioner is ``(s·M_n + εI)⁻¹`` with ``M_n`` the curvature of the first
``preconditioner_batch`` samples, factored exactly (its own ``method="auto"`` route) and
scaled by ``s = N/n`` for sum-reduced losses. MINRES needs a positive definite
preconditioner: for the Hessian the sub-batch's Gauss–Newton matrix is used
(``preconditioner="ggn"``), or none. ``log|det|``, the sign and the inertia are not
available from a Krylov solve: they raise :class:`~tallskinny.errors.UnsupportedOnRouteError`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import attrs
import torch
from torch import Tensor

from ..errors import ConvergenceWarning, SingularSystemError, UnsupportedOnRouteError

PRECONDITIONERS = ("batch", "ggn", "none")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@attrs.frozen
class Krylov:
    """Options of the ``krylov`` route (``method=Krylov(...)``; ``method="krylov"`` takes
    the defaults). Checked when made, before any work.

    ``rtol``: relative residual ``‖b − (M + εI)x‖₂ / ‖b‖₂`` to reach (``None``: ``1e-8``
    in float64, ``1000·eps`` in lower precisions: ``1.2e-4`` in float32).
    ``maxiter``: iterations (one product with ``M`` each) per solve, over all restarts
    (``None``: ``2·P``, at least 100); the true-residual check after each (re)start is
    one more product, counted in :attr:`KrylovInfo.products`.
    ``preconditioner``: ``"batch"`` (the exact factorization of the sub-batch's curvature
    of the same kind; for the Hessian, whose MINRES needs a positive definite one, its
    Gauss–Newton matrix), ``"ggn"`` (the sub-batch's Gauss–Newton matrix for either kind)
    or ``"none"``. ``preconditioner_batch``: the number of leading samples factored.
    """

    rtol: float | None = None
    maxiter: int | None = None
    preconditioner: str = "batch"
    preconditioner_batch: int = 64

    def __attrs_post_init__(self):
        if self.rtol is not None:
            if isinstance(self.rtol, bool) or not isinstance(self.rtol, numbers.Real):
                raise ValueError(f"rtol must be a real number in (0, 1), got {self.rtol!r}")
            if not (0.0 < float(self.rtol) < 1.0):
                raise ValueError(f"rtol must be in (0, 1), got {self.rtol!r}")
        if self.maxiter is not None:
            _positive_int(self.maxiter, "maxiter")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        _positive_int(self.preconditioner_batch, "preconditioner_batch")

    def tolerance(self, dtype: torch.dtype) -> float:
        if self.rtol is not None:
            return float(self.rtol)
        return max(1e-8, 1000 * torch.finfo(dtype).eps)

    def iterations(self, P: int) -> int:
        return self.maxiter if self.maxiter is not None else max(100, 2 * P)

    def preconditioner_kind(self, kind: str) -> str | None:
        """The kind of the sub-batch curvature to factor (``None``: no preconditioner)."""
        if self.preconditioner == "none":
            return None
        return "ggn" if self.preconditioner == "ggn" or kind == "hessian" else kind


@attrs.frozen
class KrylovInfo:
    """What a Krylov solve did: ``method`` (``"cg"`` or ``"minres"``), ``iterations``,
    ``products`` with ``M`` (the iterations and the true-residual checks), ``preconditioned`` (whether a preconditioner
    was applied), ``residual`` (the largest true relative residual ``‖b − (M+εI)x‖₂/‖b‖₂``
    over the columns, computed after the solve), ``rtol``, ``converged`` (``residual ≤ rtol``)
    and ``note`` (a breakdown, or why the preconditioner was left out)."""

    method: str
    iterations: int
    products: int
    preconditioned: bool
    residual: float
    rtol: float
    converged: bool
    note: str | None = None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(0)


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float,
    maxiter: int,
    precondition: Callable[[Tensor], Tensor] | None = None,
    atol: Tensor | None = None,
) -> tuple[Tensor, int, str | None]:
    """Preconditioned conjugate gradients for ``A X = B``, column-parallel (``b`` is
    ``(n, k)``), ``A`` symmetric positive definite given as ``apply``, the preconditioner
    (an SPD ``M⁻¹``) as ``precondition``. A column stops when its recursive residual is
    at most ``atol`` (default ``rtol·‖b_j‖``). Returns ``X``, the products taken (column
    blocks, i.e. iterations) and a breakdown note (``None`` if none)."""
    n, k = b.shape
    x_out = torch.zeros_like(b)
    target = rtol * b.norm(dim=0) if atol is None else atol
    active = torch.nonzero(b.norm(dim=0) > target).flatten()
    if active.numel() == 0:
        return x_out, 0, None
    x = torch.zeros(n, active.numel(), dtype=b.dtype, device=b.device)
    r = b[:, active].clone()
    z = precondition(r) if precondition is not None else r
    p = z.clone()
    rz = _dot(r, z)
    note = None
    products = 0
    while products < maxiter:
        Ap = apply(p)
        products += 1
        pAp = _dot(p, Ap)
        bad = ~(pAp > 0) | ~(rz > 0)
        if bool(bad.any()):
            note = "non-positive curvature pᵀ(M+εI)p or preconditioner rᵀM⁻¹r: a column stopped early"
        alpha = torch.where(bad, torch.zeros_like(pAp), rz / torch.where(bad, torch.ones_like(pAp), pAp))
        x.add_(p * alpha)
        r.sub_(Ap * alpha)
        done = (r.norm(dim=0) <= target[active]) | bad
        if bool(done.any()):
            x_out[:, active[done]] = x[:, done]
            keep = ~done
            active, x, r, p, rz = active[keep], x[:, keep], r[:, keep], p[:, keep], rz[keep]
            if active.numel() == 0:
                break
        z = precondition(r) if precondition is not None else r
        rz_new = _dot(r, z)
        p = z + p * (rz_new / rz)
        rz = rz_new
    if active.numel():
        x_out[:, active] = x
    return x_out, products, note


def minres(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float,
    maxiter: int,
    precondition: Callable[[Tensor], Tensor] | None = None,
    atol: Tensor | None = None,
) -> tuple[Tensor, int, str | None]:
    """Preconditioned MINRES (Paige–Saunders) for ``A X = B``, column-parallel, ``A``
    symmetric (definite or not), the preconditioner an SPD ``M⁻¹``. The residual
    ``b − A x`` is updated alongside ``x`` (from the products already taken), so a column
    stops on its 2-norm, as CG's. Returns as :func:`conjugate_gradient`."""
    n, k = b.shape
    x_out = torch.zeros_like(b)
    target = rtol * b.norm(dim=0) if atol is None else atol
    active = torch.nonzero(b.norm(dim=0) > target).flatten()
    if active.numel() == 0:
        return x_out, 0, None
    note = None
    r1 = b[:, active].clone()
    y = precondition(r1) if precondition is not None else r1.clone()
    by = _dot(r1, y)
    if bool((by <= 0).any()):
        raise ValueError("the preconditioner is not positive definite (rᵀM⁻¹r ≤ 0)")
    beta = by.sqrt()
    m = active.numel()
    zeros = lambda: torch.zeros(n, m, dtype=b.dtype, device=b.device)  # noqa: E731
    x, w, w2, Aw, Aw2 = zeros(), zeros(), zeros(), zeros(), zeros()
    res = r1.clone()  # b − A x, updated
    r2 = r1.clone()
    oldb = torch.zeros_like(beta)
    dbar = torch.zeros_like(beta)
    epsln = torch.zeros_like(beta)
    phibar = beta.clone()
    cs = -torch.ones_like(beta)
    sn = torch.zeros_like(beta)
    products = 0
    while products < maxiter:
        v = y / beta
        Av = apply(v)
        products += 1
        y = Av.clone()
        if products > 1:
            y.sub_(r1 * (beta / oldb))
        alfa = _dot(v, y)
        y.sub_(r2 * (alfa / beta))
        r1, r2 = r2, y
        y = precondition(r2) if precondition is not None else r2.clone()
        oldb = beta
        by = _dot(r2, y)
        if bool((by < 0).any()):
            raise ValueError("the preconditioner is not positive definite (rᵀM⁻¹r < 0)")
        beta = by.clamp_min(0).sqrt()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta)
        singular = gamma == 0
        if bool(singular.any()):
            note = "a zero pivot γ (A singular on the Krylov space): a column stopped early"
        gamma = torch.where(singular, torch.ones_like(gamma), gamma)
        cs = gbar / gamma
        sn = beta / gamma
        phi = torch.where(singular, torch.zeros_like(gamma), cs * phibar)
        phibar = sn * phibar
        w1, w2, w = w2, w, (v - w2 * oldeps - w * delta) / gamma
        Aw1, Aw2, Aw = Aw2, Aw, (Av - Aw2 * oldeps - Aw * delta) / gamma
        x.add_(w * phi)
        res.sub_(Aw * phi)
        done = (res.norm(dim=0) <= target[active]) | singular | (beta == 0)
        if bool(done.any()):
            x_out[:, active[done]] = x[:, done]
            keep = ~done
            active = active[keep]
            if active.numel() == 0:
                break
            x, w, w2, Aw, Aw2, res, r1, r2, y = (t[:, keep] for t in (x, w, w2, Aw, Aw2, res, r1, r2, y))
            oldb, beta, dbar, epsln, phibar, cs, sn = (t[keep] for t in (oldb, beta, dbar, epsln, phibar, cs, sn))
    if active.numel():
        x_out[:, active] = x
    return x_out, products, note


class KrylovFactorization:
    """``M + εI`` on the ``krylov`` route: no factors, an iterative solve per call.

    ``apply(x)`` is ``(M + εI)x`` in the model's dtype; ``preconditioner`` an exact
    factorization (with ``solve(b, refine=0)``) of the sub-batch curvature plus ``εI`` or
    ``None``. ``info`` is the :class:`KrylovInfo` of the last solve."""

    def __init__(self, apply, damping: float, options: Krylov, kind: str, numel: int, dtype: torch.dtype,
                 preconditioner=None, note: str | None = None):
        self._apply = apply
        self.damping = damping
        self.options = options
        self.kind = kind
        self.dtype = dtype
        self.numel = numel
        self._preconditioner = preconditioner
        self._note = note
        self.info: KrylovInfo | None = None
        self.norm_lower_bound = 0.0

    def _product(self, v: Tensor) -> Tensor:
        return self._apply(v.to(self.dtype)).to(torch.float64)

    def _precondition(self, r: Tensor) -> Tensor:
        return self._preconditioner.solve(r.to(self.dtype), refine=0).to(torch.float64)

    def solve(self, rhs: Tensor) -> Tensor:
        rtol = self.options.tolerance(self.dtype)
        budget = self.options.iterations(self.numel)
        method = "cg" if self.kind == "ggn" else "minres"
        run = conjugate_gradient if method == "cg" else minres
        precondition = self._precondition if self._preconditioner is not None else None
        b = rhs.to(torch.float64)
        b_norm = b.norm(dim=0)
        target = rtol * b_norm
        x = torch.zeros_like(b)
        residual = b
        products, iterations, note = 0, 0, None
        while True:
            dx, used, why = run(self._product, residual, rtol=rtol, maxiter=budget - iterations,
                                precondition=precondition, atol=target)
            products += used
            iterations += used
            note = note or why
            x = x + dx
            residual = b - self._product(x)
            products += 1
            r_norm = residual.norm(dim=0)
            ok = r_norm <= target
            # restart from the true residual where the recursive one drifted from it
            if bool(ok.all()) or iterations >= budget or used == 0 or why is not None:
                break
        rel = torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)),
                          torch.zeros_like(b_norm))
        worst = float(rel.max()) if rel.numel() else 0.0
        converged = bool(ok.all())
        self.info = KrylovInfo(method, iterations, products, precondition is not None, worst, rtol, converged,
                               note or self._note)
        if not math.isfinite(worst):
            raise SingularSystemError(
                f"the {method} solve diverged (residual {worst}) at damping={self.damping:g}", damping=self.damping
            )
        if not converged:
            warnings.warn(
                f"the krylov route's {method} did not converge: relative residual {worst:.1e} after "
                f"{products} products (rtol {rtol:.1e}, maxiter {budget})"
                + (f"; {note or self._note}" if (note or self._note) else ""),
                ConvergenceWarning,
                stacklevel=5,
            )
        return x.to(rhs.dtype)

    def _unavailable(self, what: str):
        raise UnsupportedOnRouteError(
            f"{what} is not available on the krylov route (an iterative solve gives no factors); "
            "take an exact route for it (method='auto', 'riccati', 'kernel' or 'dense')",
            route="krylov", operation=what,
        )

    def logdet(self):
        self._unavailable("logdet()")

    def sign(self):
        self._unavailable("sign()")

    def inertia(self):
        self._unavailable("inertia()")


def memory_bytes(P: int, columns: int, itemsize: int) -> int:
    """The Krylov vectors of a solve: about 12 float64 ``(P, k)`` blocks (MINRES; CG
    fewer) and two in the model's dtype."""
    return P * max(columns, 1) * (12 * 8 + 2 * itemsize)


def make_factorization(apply, damping: float, options: Krylov, kind: str, numel: int, dtype, preconditioner_curvature):
    """The :class:`KrylovFactorization` of ``M + εI``, its preconditioner the exact
    factorization of ``preconditioner_curvature`` (scaled) plus ``εI`` where that is regular."""
    pre, note = None, None
    if preconditioner_curvature is not None:
        curv, scale = preconditioner_curvature
        try:
            pre = _Scaled(curv, scale, damping) if scale != 1.0 else curv.factorize(damping)
        except SingularSystemError:
            note = f"the sub-batch curvature + εI is singular at damping={damping:g}: no preconditioner"
    return KrylovFactorization(apply, damping, options, kind, numel, dtype, pre, note)


class _Scaled:
    """``(s·M_n + εI)⁻¹ = (M_n + (ε/s)I)⁻¹ / s``."""

    def __init__(self, curvature, scale: float, damping: float):
        self.scale = scale
        self.inner = curvature.factorize(damping / scale)

    def solve(self, b: Tensor, refine: int = 0) -> Tensor:
        return self.inner.solve(b, refine=refine) / self.scale


def preconditioner_curvature(chain, inputs: Tensor, targets, kind: str, method, memory_limit):
    """``(sub-batch curvature, scale)`` for the krylov route's preconditioner, or ``None``
    (an exact route; ``preconditioner="none"``): the curvature (its own ``auto`` route) of
    the first ``preconditioner_batch`` samples, and ``s = N/n`` where the loss sums over
    samples (told apart from a mean by the loss of the sub-batch given twice: twice the
    loss for a sum, the same for a mean)."""
    if not (isinstance(method, Krylov) or method == "krylov"):
        return None
    options = method if isinstance(method, Krylov) else Krylov()
    sub_kind = options.preconditioner_kind(kind)
    if sub_kind is None:
        return None
    N = inputs.shape[0]
    n = min(options.preconditioner_batch, N)
    X, y = inputs[:n].detach().clone(), targets[:n].clone()
    sub = chain.curvature(X, y, kind=sub_kind, method="auto", memory_limit=memory_limit)
    scale = 1.0
    if n < N:
        with torch.no_grad():
            once = float(chain(X, y))
            twice = float(chain(torch.cat([X, X]), torch.cat([y, y])))
        if once != 0.0 and abs(twice / once - 2.0) < 1e-3:
            scale = N / n
    return sub, scale
