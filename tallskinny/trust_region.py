"""The trust-region subproblem ``min_x gᵀx + ½xᵀHx  subject to  ‖x‖ ≤ Δ``, solved exactly.

The solution (Moré & Sorensen, 1983) is ``x = −(H + λI)⁻¹ g`` for the unique ``λ ≥ 0``
with ``H + λI ⪰ 0`` and ``λ(Δ − ‖x‖) = 0``. The solver needs only factorizations of
``H + λI`` that report their inertia (so "is ``H + λI`` positive definite?" is one
factorization, see :meth:`tallskinny.Factorization.inertia`) and solves with them:

* ``λ = 0`` is tried first: if ``H ≻ 0`` and ``‖H⁻¹g‖ ≤ Δ`` the step is interior.
* Otherwise ``λ`` is found by a safeguarded Newton iteration on the secular equation
  ``φ(λ) = 1/‖x(λ)‖ − 1/Δ = 0``, whose derivative needs one more solve:
  ``φ'(λ) = xᵀ(H + λI)⁻¹x / ‖x‖³``, hence the step
  ``λ ← λ + (‖x‖/Δ − 1)·‖x‖²/(xᵀ(H + λI)⁻¹x)``.
  A bracket ``[λ_lo, λ_hi]`` of ``λ*`` is kept: ``λ_hi`` shrinks at every positive
  definite ``λ`` with ``‖x‖ < Δ``, ``λ_lo`` grows at every ``λ`` that is not positive
  definite (or is, with ``‖x‖ > Δ``) and by the Rayleigh-quotient bound
  ``−λ_min(H) ≥ −zᵀHz/zᵀz``; a Newton iterate outside the bracket is replaced by a
  bisection point.
* The *hard case* (``g`` orthogonal to the eigenvectors of ``λ_min(H) < 0``, where
  ``‖x(λ)‖ < Δ`` for every ``λ > −λ_min``): ``z`` is an approximate eigenvector of
  ``λ_min`` from inverse iteration with the current factorization, and the step is
  ``x + τz`` with ``‖x + τz‖ = Δ`` and the root ``τ`` of lower model value, accepted
  once ``λ − λ_lo`` (an upper bound of ``λ − λ*``) is below the tolerance.
* ``H ⪰ 0`` singular with ``λ* = 0`` (a Gauss–Newton matrix whose range contains ``g``):
  after ``λ = 0`` fails, one tiny ``λ = rtol·‖g‖/Δ`` gives the minimum-norm minimiser,
  returned without a null-space component (it would not lower the model).

A singular ``H + λI`` (a ReLU network at ``λ = 0``) is not an error here: it counts as
"not positive definite".
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol

import attrs
import torch
from torch import Tensor

from .errors import AccuracyWarning
from .linalg import Inertia, SingularMatrixError


class ShiftedFactorization(Protocol):
    """What the subproblem solver needs of a factorization of ``H + λI``."""

    def solve(self, b: Tensor) -> Tensor: ...

    def inertia(self) -> Inertia: ...


class FactorizableOperator(Protocol):
    """What the subproblem solver needs: ``factorize(λ)`` of ``H + λI`` and ``hvp``.

    :class:`tallskinny.Curvature` is one; ``factorize`` raises a
    :class:`~tallskinny.linalg.SingularMatrixError` (or ``torch.linalg.LinAlgError``)
    when ``H + λI`` is singular.
    """

    def factorize(self, damping: float) -> ShiftedFactorization: ...

    def hvp(self, v: Tensor) -> Tensor: ...


@attrs.frozen
class TrustRegionStep:
    """The solution of one trust-region subproblem.

    ``step`` the minimiser ``x``; ``multiplier`` the ``λ ≥ 0`` with
    ``(H + λI) x = −g``; ``model_decrease`` ``−(gᵀx + ½xᵀHx) ≥ 0``; ``boundary``
    whether ``‖x‖ = Δ``; ``hard_case`` whether an eigenvector component was added;
    ``factorizations`` how many factorizations of ``H + λI`` it took.
    """

    step: Tensor
    multiplier: float
    model_decrease: float
    boundary: bool
    hard_case: bool
    factorizations: int


def _check_radius(radius) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        if isinstance(radius, Tensor) and radius.dim() == 0 and radius.dtype.is_floating_point:
            radius = float(radius)
        else:
            raise TypeError(f"radius must be a real number, got {type(radius).__name__}")
    radius = float(radius)
    if not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a finite number > 0, got {radius}")
    return radius


def solve_subproblem(
    operator: FactorizableOperator,
    gradient: Tensor,
    radius: float,
    *,
    rtol: float = 1e-10,
    max_factorizations: int = 100,
    initial_multiplier: float | None = None,
) -> TrustRegionStep:
    """``argmin gᵀx + ½xᵀHx`` over ``‖x‖ ≤ radius``, exactly (see the module docstring).

    ``operator`` provides ``factorize(λ)`` (with ``solve`` and ``inertia``) and ``hvp``
    for ``H`` — a :class:`tallskinny.Curvature` or any object with those methods;
    ``gradient`` is the flat ``g`` (``(P,)``). On return ``‖x‖ ≤ Δ``, equal to ``Δ``
    within ``rtol`` relative when ``λ > 0``, and ``λ`` is within ``rtol·max(λ, ‖g‖/Δ)``
    of the exact multiplier in the hard case (to the accuracy of the secular equation
    otherwise). Raises ``RuntimeError`` if ``max_factorizations`` do not suffice.

    ``initial_multiplier`` (a warm start, e.g. the previous step's ``λ``) is tried first:
    where ``H + λI ≻ 0`` there and ``‖x(λ)‖ > Δ``, then ``λ* > λ`` and the search starts
    there, skipping ``λ = 0`` (which, for an over-parametrised Gauss–Newton matrix, is
    always singular).
    """
    radius = _check_radius(radius)
    if not isinstance(gradient, Tensor) or gradient.dim() != 1:
        shape = tuple(gradient.shape) if isinstance(gradient, Tensor) else type(gradient).__name__
        raise ValueError(f"gradient must be a flat (P,) tensor, got {shape}")
    if not bool(torch.isfinite(gradient).all()):
        raise ValueError("gradient contains NaN or inf")
    if not (0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if initial_multiplier is not None:
        initial_multiplier = float(initial_multiplier)
        if not math.isfinite(initial_multiplier) or initial_multiplier < 0:
            raise ValueError(f"initial_multiplier must be a finite number >= 0, got {initial_multiplier}")
    solver = _Solver(operator, gradient, radius, rtol, max_factorizations)
    return solver.run(initial_multiplier or 0.0)


class _Solver:
    def __init__(self, operator, g: Tensor, radius: float, rtol: float, max_factorizations: int):
        self.op = operator
        self.g = g
        self.radius = radius
        self.rtol = rtol
        self.budget = max_factorizations
        self.count = 0
        self.gnorm = float(g.norm())

    # -- helpers -------------------------------------------------------------------------
    def factorize(self, lam: float):
        """The factorization of ``H + λI`` if it is positive definite, else ``None``."""
        if self.count >= self.budget:
            raise RuntimeError(
                f"the trust-region subproblem did not converge within {self.budget} factorizations "
                f"(radius={self.radius:g}, ‖g‖={self.gnorm:g})"
            )
        self.count += 1
        try:
            fact = self.op.factorize(lam)
        except (SingularMatrixError, torch.linalg.LinAlgError):
            return None
        inertia = fact.inertia()
        if inertia.negative or inertia.zero:
            return None
        return fact

    def solve(self, fact, b: Tensor) -> Tensor:
        # λ near −λ_min(H) (the hard case, inverse iteration) makes H + λI nearly singular
        # on purpose: the accuracy the subproblem needs is checked by the iteration itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccuracyWarning)
            x = fact.solve(b)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("a solve with H + λI overflowed")
        return x

    def result(self, x: Tensor, lam: float, boundary: bool, hard: bool) -> TrustRegionStep:
        Hx = self.op.hvp(x)
        decrease = -float(self.g @ x + 0.5 * (x @ Hx))
        return TrustRegionStep(x, lam, decrease, boundary, hard, self.count)

    def eigen_lower_bound(self, fact, x: Tensor) -> tuple[Tensor, float]:
        """Inverse iteration with ``(H + λI)⁻¹`` from ``x`` (plus a fixed perturbation)
        towards the eigenvector of the smallest eigenvalue; returns the unit ``z`` and
        the Rayleigh quotient ``zᵀHz`` (``≥ λ_min(H)``)."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        z = x / max(float(x.norm()), 1e-300) + 1e-3 * noise / float(noise.norm())
        z = z / z.norm()
        for _ in range(4):
            z = self.solve(fact, z)
            z = z / z.norm()
        return z, float(z @ self.op.hvp(z))

    # -- the iteration -------------------------------------------------------------------
    def run(self, initial: float) -> TrustRegionStep:
        g, radius, rtol = self.g, self.radius, self.rtol
        lo, hi = 0.0, math.inf  # bracket of λ*
        if initial > 0:
            fact = self.factorize(initial)
            if fact is not None:
                x = self.solve(fact, -g)
                if float(x.norm()) > radius:
                    return self.iterate(x, fact, initial, initial, hi)
                hi = initial
        fact = self.factorize(0.0)
        if fact is not None:
            x = self.solve(fact, -g)
            if float(x.norm()) <= radius:
                return self.result(x, 0.0, False, False)
            lam = 0.0
        else:
            # H is not positive definite. A positive semidefinite H (a Gauss–Newton matrix)
            # usually has λ* = 0 with g in its range: one tiny λ settles that.
            lam = rtol * self.gnorm / radius
            fact = self.factorize(lam) if lam > 0 else None
            if fact is not None:
                x = self.solve(fact, -g)
            else:
                lo = lam
                lam = max(self.gnorm / radius, 1e-8 * max(self.gnorm, 1.0), 1e-12)
        while fact is None:
            # find a λ that makes H + λI positive definite, growing geometrically
            fact = self.factorize(lam)
            if fact is not None:
                x = self.solve(fact, -g)
                break
            lo = lam
            lam *= 4.0
        return self.iterate(x, fact, lam, lo, hi)

    def iterate(self, x: Tensor, fact, lam: float, lo: float, hi: float) -> TrustRegionStep:
        """Safeguarded Newton on the secular equation from ``x = x(λ)``, ``λ* ∈ [lo, hi]``."""
        g, radius, rtol = self.g, self.radius, self.rtol
        while True:
            xnorm = float(x.norm())
            if abs(xnorm - radius) <= rtol * radius:
                return self.result(x * (radius / xnorm) if xnorm > radius else x, lam, True, False)
            if xnorm > radius:
                lo = max(lo, lam)
            else:
                hi = min(hi, lam)
                # λ is too large; is this the hard case? bound −λ_min from below
                z, rayleigh = self.eigen_lower_bound(fact, x)
                lo = max(lo, -rayleigh)
                small = math.sqrt(rtol) * self.gnorm / radius
                if -rayleigh <= small and lam <= small:
                    # H ⪰ 0 to working accuracy and λ* ≈ 0: x is the minimum-norm minimiser
                    return self.hard_case_step(x, z, lam, semidefinite=True)
                if lam - lo <= rtol * max(lam, self.gnorm / radius):
                    return self.hard_case_step(x, z, lam, semidefinite=False)
            w = self.solve(fact, x)
            curvature = float(x @ w)
            newton = lam + (xnorm / radius - 1.0) * xnorm**2 / curvature if curvature > 0 else math.nan
            if not (lo < newton < hi):
                newton = self.bisect(lo, hi, lam)
            new_fact = self.factorize(newton)
            while new_fact is None:
                # not positive definite: −λ_min is above this trial; the lower bound is
                # loose now, so halve the bracket
                lo = max(lo, newton)
                newton = self.bisect(lo, hi, lam, fraction=0.5)
                new_fact = self.factorize(newton)
            lam, fact = newton, new_fact
            x = self.solve(fact, -g)

    def bisect(self, lo: float, hi: float, lam: float, fraction: float = 0.05) -> float:
        """A safeguard point inside ``(lo, hi)``: by default close to ``lo`` (a Rayleigh-quotient
        bound, where the Newton iterates converge from and the hard case sits), expanding
        when ``hi`` is unknown."""
        if math.isinf(hi):
            return max(2.0 * lo, lo + self.gnorm / self.radius, 4.0 * lam)
        return lo + fraction * (hi - lo)

    def hard_case_step(self, x: Tensor, z: Tensor, lam: float, *, semidefinite: bool) -> TrustRegionStep:
        """``x + τz`` on the boundary, ``τ`` the root of ``‖x + τz‖ = Δ`` with the lower model
        value — or ``x`` itself where that is as good (``λ* = 0``: ``H ⪰ 0`` is singular and
        ``x`` is its minimum-norm minimiser; moving along the null space gains nothing)."""

        def value(s: Tensor) -> float:
            return float(self.g @ s + 0.5 * (s @ self.op.hvp(s)))

        xz = float(x @ z)
        gap = self.radius**2 - float(x @ x)
        disc = math.sqrt(xz * xz + max(gap, 0.0))
        best_value, best = math.inf, x
        for tau in (-xz + disc, -xz - disc):
            s = x + tau * z
            s = s * min(1.0, self.radius / float(s.norm()))
            v = value(s)
            if v < best_value:
                best_value, best = v, s
        x_value = value(x)
        if semidefinite or x_value <= best_value + self.rtol * max(abs(x_value), 1e-300):
            return TrustRegionStep(x, lam, -x_value, False, False, self.count)
        return TrustRegionStep(best, lam, -best_value, True, True, self.count)
