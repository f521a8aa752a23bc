"""The curvature of a chain's loss at one point: ``H`` (or the Gauss–Newton ``G``) as
the list of per-block oracles, with products, solves, log-determinants and inertia."""

from __future__ import annotations

import math
import operator
import warnings
from typing import Callable, Sequence

import attrs
import torch
from torch import Tensor

from . import elimination, resources, routes, spectrum
from .elimination import workspace
from .collector import collector_paused
from .blocks.protocol import Oracle
from .errors import AccuracyWarning, SingularSystemError, StaleCurvatureError, real_number
from .linalg import Dense, Inertia
from .linalg.gmres import gmres
from .resources import MemoryEstimate, check_memory_limit, format_bytes
from .vectors import ParameterLayout, gaussian

KINDS = ("hessian", "ggn")

PRECISIONS = ("auto", "full", "mixed")
"""``precision`` of :meth:`Curvature.factorize` and the solves: ``"full"`` factors in the
curvature's dtype; ``"mixed"`` factors a float64 curvature in float32 and refines in
float64 (:data:`MIXED_MAX_REFINEMENTS`); ``"auto"`` takes ``"mixed"`` where it pays (a
float64 curvature on the ``riccati`` route whose largest activation has at least
``elimination.mixed.MIN_STAGE`` entries), else ``"full"``."""

MIXED_MAX_REFINEMENTS = 30
"""A mixed-precision solve takes at most this many refinement steps (GMRES steps, one HVP
and one float32 solve each; LAPACK dsgesv's ``ITERMAX``); where the backward error is
still above ``BACKWARD_ERROR_TOLERANCE·eps`` of float64, or a correction did not halve it
(the float32 factors too inaccurate for this ``H + εI`` even as a preconditioner), the
factorization is made again in float64 and solves from there on."""

RESCUE_STEPS = 20
"""Where stationary refinement of a full-precision solve stalls above tolerance, GMRES
steps (preconditioned with the same factors) tried before the pivoted fallback."""

GMRES_RTOL = 1e-4
"""A correction ``(H+εI)d = r`` of GMRES-based refinement (a mixed-precision solve, or the
rescue of a stalled one) is solved by GMRES (:func:`~tallskinny.linalg.gmres.gmres`,
preconditioned by the factorization's solve) to the relative residual ``0.1·tol/η`` that
would bring the backward error ``η`` to ``tol`` in one correction, at most this and at
least :data:`GMRES_RTOL_FLOOR`."""

GMRES_RTOL_FLOOR = 1e-12
"""The smallest relative residual asked of one GMRES correction (float64's recurrence)."""

GMRES_STEPS = 10
"""GMRES steps of one correction at most (then the backward error is checked again)."""

GMRES_STAGNATION = 3
"""A correction stops early where this many GMRES steps did not halve its residual (a
preconditioner too poor to pay)."""

BACKWARD_ERROR_TOLERANCE = 64
"""``solve(refine=None)`` refines when the estimated normwise backward error
``‖b − (H+εI)x‖ / (‖H+εI‖·‖x‖ + ‖b‖)`` of the solution exceeds this many units of
roundoff of the dtype (``64·eps``: 1.4e-14 in float64, 7.6e-6 in float32)."""

MAX_REFINEMENTS = 3
"""``solve(refine=None)`` refines at most this many times, each step checked again, and
stops early where a step did not halve the backward error (LAPACK's rule)."""

WARNING_FACTOR = 1024
"""``solve(refine=None)`` warns (:class:`~tallskinny.errors.AccuracyWarning`) where the
backward error it ends with is above this many times the tolerance (1.5e-11 in float64):
far from rounding level, not the last digits of a nearly singular system."""


def check_damping(damping) -> float:
    """A damping ``ε`` must be a finite real number ``≥ 0``."""
    damping = real_number(damping, "damping")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    return damping


def check_shift(shift) -> float:
    """A shift ``σ`` (of ``H − σI``) must be a finite real number, of any sign."""
    return real_number(shift, "shift")


def check_refine(refine) -> None:
    """``refine`` must be ``None`` or an integer ``≥ 0``."""
    if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 0):
        raise ValueError(f"refine must be None or an integer >= 0, got {refine!r}")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


FACTORIZATION_TOLERANCE = 512
"""``logdet()``, ``sign()`` and ``inertia()`` of a Hessian factorization first check the
stagewise elimination: one solve with a fixed random right-hand side and one HVP estimate
the normwise backward error ``η`` of its factors (as ``solve`` does). A perturbation of
normwise size ``η‖H+εI‖`` moves ``log|det|`` by at most about ``P·η·cond`` and leaves the
inertia exact where ``η·cond < 1``; above this many units of roundoff (``1.1e-13`` in
float64, the ``1e-13·P·cond`` of the documented accuracy) the elimination may have lost
accuracy to element growth, and the quantities are taken from the pivoted KKT
factorization instead (Bunch–Kaufman pivoting: no such growth)."""

PIVOTED_FALLBACK_BYTES = 2 * 2**30
"""The pivoted KKT fallback forms dense blocks of size ``p_l + 2a_l`` per block: it is
tried only where they need at most this many bytes (else the warning says so)."""

DENSE_VERDICT_PARAMETERS = 2048
"""Where the elimination and its pivoted fallback find ``H + εI`` singular and ``P`` is at
most this, the verdict is taken from the eigenvalues of the dense matrix (``P`` HVPs and an
eigendecomposition): the block-tridiagonal KKT factorization pivots only inside its
blocks and can break down on a regular system."""

_VERSION = operator.attrgetter("_version")


class ParameterVersions:
    """The version counters (``Tensor._version``) of the tensors a curvature is computed
    from, recorded when it is made, and the check that none of them changed.

    PyTorch increments a tensor's counter at every in-place operation on it or on a tensor
    sharing its memory (``add_``, ``copy_``, an optimizer step) and never decreases it, so
    the sum of the counters equals its recorded value exactly when no tensor changed: one
    pass over the tensors and one integer comparison per check. Writes that bypass the
    counter are not seen: through ``.data``, and the fused optimizer kernels
    (``torch.optim.Adam(..., fused=True)`` and the like, torch 2.13).
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[Tensor]):
        if len(names) != len(tensors):
            raise ValueError(f"{len(names)} names for {len(tensors)} tensors")
        self.names = tuple(names)
        self.tensors = tuple(tensors)
        self.versions = tuple(map(_VERSION, self.tensors))
        self._total = sum(self.versions)

    def check(self) -> None:
        """Raise :class:`~tallskinny.errors.StaleCurvatureError`, naming the first changed
        tensor, if any tensor changed in place since the record."""
        if sum(map(_VERSION, self.tensors)) == self._total:
            return
        for name, t, version in zip(self.names, self.tensors, self.versions):
            if t._version != version:
                raise StaleCurvatureError(
                    f"the parameter {name!r} was changed in place after this curvature was made "
                    "(its version counter moved); the curvature shares memory with the "
                    "parameters and would mix old and new values. Call chain.curvature(...) again "
                    "at the new parameters",
                    parameter=name,
                )


class SolveChecks:
    """What the backward-error test of one curvature's solves has learnt so far.

    ``norm_bound`` is a lower bound of ``‖H‖``, raised by every bound seen: ``‖(H+εI)x‖/‖x‖``
    of the solves, the last Linear blocks' ``‖H_ll‖`` (:meth:`blocks_bound`) and
    ``‖Hg‖/‖g‖`` (:meth:`gradient_bound`), these two computed at most once. A low bound
    only makes the test stricter. ``refinements`` counts the refinement steps taken."""

    def __init__(self, blocks: Callable[[], float], gradient: Callable[[], float]):
        self.norm_bound = 0.0
        self.refinements = 0
        self.blocks_done = self.gradient_done = False
        self._blocks, self._gradient = blocks, gradient

    def raise_bound(self, bound: float) -> None:
        self.norm_bound = max(self.norm_bound, bound)

    def blocks_bound(self) -> float | None:
        """The last Linear blocks' bound, the first time only (``None`` after)."""
        if self.blocks_done:
            return None
        self.blocks_done = True
        bound = self._blocks()
        self.raise_bound(bound)
        return bound

    def gradient_bound(self) -> float | None:
        """``‖Hg‖/‖g‖``, the first time only (``None`` after)."""
        if self.gradient_done:
            return None
        self.gradient_done = True
        bound = self._gradient()
        self.raise_bound(bound)
        return bound


class Factorization:
    """``H + εI`` factored once; solves any number of right-hand sides.

    ``logdet()`` is ``log|det(H + εI)|``, ``sign()`` the sign of the determinant and
    ``inertia()`` the counts ``(positive, negative, zero)`` of eigenvalues of ``H + εI``.
    Solves use the stagewise elimination (refined and checked); the three spectral
    quantities come from a factorization whose backward error was checked
    (:data:`FACTORIZATION_TOLERANCE`).

    ``precision`` is ``"full"`` (factors in the curvature's dtype) or ``"mixed"`` (float32
    factors of a float64 curvature, solves refined in float64 to the same backward error).
    A mixed factorization becomes ``"full"`` (one float64 factorization, made then) where
    its refinement stalls, or on the first ``logdet``, ``sign`` or ``inertia``, which are
    never read from float32 factors; ``fallback`` then says why (``None`` otherwise).
    """

    def __init__(self, inner, curvature: "Curvature", damping: float, precision: str = "full", fallback=None):
        self._inner = inner
        self._curvature = curvature
        self._layout = curvature.layout
        self.damping = damping
        self.precision = precision
        self.fallback = fallback
        self._scratch = None  # the buffer of the last check's (H+εI)x, reused by the next
        self._pooled_scratch = False  # whether a check buffer came from the workspace pool
        self._norm_hint = inner.norm_lower_bound  # a lower bound of ‖H‖ the elimination knows
        self._pivoted = None  # the KKT factorization, made where the elimination lost accuracy
        self._spectral = None  # the checked factorization logdet/sign/inertia read
        self._error = None  # (η, cond) of the elimination, estimated once

    @property
    def info(self):
        """The krylov route: the :class:`~tallskinny.routes.KrylovInfo` of the last solve
        (products, residual reached, converged); ``None`` on the exact routes."""
        return self._inner.info if isinstance(self._inner, routes.KrylovFactorization) else None

    @collector_paused
    def solve(self, b, *, refine: int | None = None):
        """``(H + εI)^{-1} b`` in the format of ``b`` (flat or per-parameter, one or k columns).

        A step of iterative refinement is ``x ← x + F⁻¹(b − (H+εI)x)``: one exact HVP
        (through the oracles) and one more pair of sweeps. ``refine=None`` (the default)
        checks the solution instead of guessing: it computes the residual with one HVP,
        estimates the normwise backward error ``η = ‖r‖ / (‖H+εI‖·‖x‖ + ‖b‖)`` (with a lower
        bound of ``‖H+εI‖``, so that ``η`` is overestimated, never under)
        and, where ``η`` exceeds ``BACKWARD_ERROR_TOLERANCE·eps``, refines with that
        residual and checks again, at most ``MAX_REFINEMENTS`` times. The
        elimination does not pivot across blocks, so at small damping its backward error
        can reach 1e-10 on some right-hand sides; one step usually brings it back to
        rounding level. Where refinement stalls above tolerance, GMRES preconditioned with
        the same factors takes over (:data:`RESCUE_STEPS`, each one HVP and one solve),
        and where that stalls too, the solve is done again
        with the pivoted KKT factorization (kept for later solves), and an
        :class:`~tallskinny.errors.AccuracyWarning` is given where ``η`` ends far above
        tolerance (``WARNING_FACTOR`` times).
        ``0`` never refines (no HVP), ``k`` always refines ``k`` times.

        A mixed-precision factorization (``precision == "mixed"``) solves in float32 and,
        with ``refine=None``, refines in float64 until the same backward-error test passes:
        each correction by GMRES preconditioned with the float32 factors
        (:data:`MIXED_MAX_REFINEMENTS` steps in all; where a correction does not halve the
        backward error, it factors in float64 and solves as above); ``refine=k`` refines
        the float32 solution ``k`` times by plain (stationary) refinement.

        ``b`` must be finite; its autograd history is ignored (the solution carries no
        graph). Zero right-hand sides (``(P, 0)``) give an empty result.
        """
        self._curvature._check_current()
        check_refine(refine)
        rhs, fmt = self._layout.to_flat(b, "b")
        return self._solve(rhs, fmt, refine)

    def _solve(self, rhs: Tensor, fmt, refine: int | None):
        """:meth:`solve` for a validated flat ``(P, k)`` right-hand side."""
        if rhs.shape[1] == 0:
            return self._layout.from_flat(rhs.new_zeros(rhs.shape), fmt)
        self._curvature._check_solve(rhs.shape[1], mixed=refine is None and self.precision == "mixed")
        if refine is None and isinstance(self._inner, routes.KrylovFactorization):
            refine = 0  # an iterative solve checks its own residual (and warns)
        x = None
        if refine is None and self.precision == "mixed":
            x, why = self._mixed_solve(rhs)
            if x is None:
                self._to_full(why)
        if x is None and refine is None:
            x, eta, steps = self._checked_solve(rhs)
            tol = BACKWARD_ERROR_TOLERANCE * torch.finfo(x.dtype).eps
            if eta > tol and self._curvature._gmres_fits(rhs.shape[1]):
                # stationary refinement stalled (element growth in the stages): GMRES
                # preconditioned with the same factors, before any pivoted factorization
                x2, eta2, steps2, _ = self._gmres_refinement(rhs, x, RESCUE_STEPS)
                steps += steps2
                if eta2 < eta:
                    x, eta = x2, eta2
            if eta > tol and self._pivoted is None and self._pivoted_fits():
                # refinement stalled above tolerance: element growth in the stages; the
                # pivoted KKT factorization solves from here on
                self._inner = self._pivoted = self._pivoted_factorization()
                x2, eta2, steps2 = self._checked_solve(rhs)
                if eta2 <= eta:
                    x, eta, steps = x2, eta2, steps2
            if eta > WARNING_FACTOR * tol:
                warnings.warn(
                    f"the estimated backward error of the solution is {eta:.1e} after {steps} "
                    f"refinements (tolerance {tol:.1e}): H + εI is too ill-conditioned for the "
                    f"elimination at damping={self.damping:g}",
                    AccuracyWarning,
                    stacklevel=2,
                )
        elif x is None:
            x = self._inner.solve(rhs)
            for _ in range(refine):
                residual = rhs - self._curvature._apply(x, shift=self.damping)
                x = x + self._inner.solve(residual)
        # a finite sum has no inf or NaN terms (one reduction instead of an elementwise test)
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise SingularSystemError(
                f"the solution overflowed: H + εI is too ill-conditioned at damping={self.damping:g}",
                damping=self.damping,
            )
        return self._layout.from_flat(x, fmt)

    def _mixed_solve(self, rhs: Tensor) -> tuple[Tensor | None, str | None]:
        """The float32 solve refined in float64 until the estimated backward error is at
        most ``BACKWARD_ERROR_TOLERANCE·eps`` of float64 (the test of :meth:`solve`), by
        :meth:`_gmres_refinement` with the float32 factors. ``(None, why)`` where a
        correction did not halve the backward error or :data:`MIXED_MAX_REFINEMENTS`
        steps did not reach it."""
        x, _, _, why = self._gmres_refinement(rhs, self._inner.solve(rhs), MIXED_MAX_REFINEMENTS)
        return (x, None) if why is None else (None, f"the float64 refinement of the float32 solve {why}")

    def _gmres_refinement(self, rhs: Tensor, x: Tensor, budget: int) -> tuple[Tensor, float, int, str | None]:
        """GMRES-based iterative refinement (Carson–Higham) of ``x`` in the curvature's
        dtype: while the backward error is above ``BACKWARD_ERROR_TOLERANCE·eps``, the
        correction ``(H+εI)d = b − (H+εI)x`` by GMRES preconditioned with this
        factorization's solve, to the relative residual that one correction needs
        (:data:`GMRES_RTOL`), a step one HVP and one solve; ``budget`` steps in all.
        Returns the best ``x``, its backward error (``0`` below tolerance), the steps and,
        where it stopped above tolerance, why (a correction did not halve the backward
        error, or the budget)."""
        tol = BACKWARD_ERROR_TOLERANCE * torch.finfo(x.dtype).eps
        best, best_eta, last, steps = x, math.inf, math.inf, 0
        while True:
            residual, buffer, eta = self._checked_residual(rhs, x, tol)
            if residual is None:
                self._scratch = buffer
                return x, 0.0, steps, None
            if eta < best_eta:  # (NaN: not <)
                best, best_eta = x, eta
            if not math.isfinite(eta) or not eta <= 0.5 * last or steps >= budget:
                self._scratch = buffer
                if not math.isfinite(eta):
                    why = f"gave a non-finite residual after {steps} steps"
                elif steps < budget:
                    why = f"did not halve the backward error ({eta:.1e} after {steps} steps)"
                else:
                    why = f"left the backward error at {eta:.1e} after {steps} steps"
                return best, best_eta, steps, why
            correction, taken = gmres(
                lambda v: self._curvature._apply(v, shift=self.damping),
                self._inner.solve,
                residual,
                rtol=min(GMRES_RTOL, max(0.1 * tol / eta, GMRES_RTOL_FLOOR)),
                maxiter=min(GMRES_STEPS, budget - steps),
                stagnation=GMRES_STAGNATION,
            )
            steps += taken
            self._curvature.checks.refinements += taken
            x = x + correction
            self._scratch = buffer  # free again for the next check
            last = eta

    def _to_full(self, why: str) -> None:
        """Leave mixed precision: factor ``H + εI`` in float64 (solves and the spectral
        quantities use it from here on)."""
        self._inner = None  # the float32 factors are freed before the float64 ones are made
        self._inner = self._curvature._factorize_inner(self.damping)
        self._norm_hint = self._inner.norm_lower_bound
        self.precision, self.fallback = "full", why

    def _checked_solve(self, rhs: Tensor) -> tuple[Tensor, float, int]:
        """A solve refined by LAPACK's rule (xGERFS): while the backward error is above
        tolerance and each step at least halves it, at most ``MAX_REFINEMENTS`` steps.
        Returns the solution, its estimated backward error (``0`` below tolerance) and the
        number of steps."""
        x = self._inner.solve(rhs)
        tol = BACKWARD_ERROR_TOLERANCE * torch.finfo(x.dtype).eps
        last = math.inf
        for step in range(MAX_REFINEMENTS + 1):
            residual, buffer, eta = self._checked_residual(rhs, x, tol)
            go_on = residual is not None and step < MAX_REFINEMENTS and eta <= 0.5 * last
            if go_on:
                self._curvature.checks.refinements += 1
                x = x + self._inner.solve(residual)
            self._scratch = buffer  # free again for the next check
            if not go_on:
                break
            last = eta
        return x, eta, step

    def _checked_residual(self, rhs: Tensor, x: Tensor, tol: float) -> tuple[Tensor | None, Tensor, float]:
        """The residual ``b − (H+εI)x`` if the backward error of ``x`` is above ``tol``
        (else ``None``), the buffer it is made in (for the next check) and the largest
        estimated backward error of a column (``0`` below ``tol``).

        ``‖H+εI‖`` is bounded below by ``‖(H+εI)x‖/‖x‖ ≥ (‖b‖ − ‖r‖)/‖x‖``, by the last block's diagonal
        block of ``H`` (known from the factorization), by every such bound seen before on
        this curvature and, where those fail the test, by the diagonal blocks of the last
        Linear layers and then by ``‖Hg‖/‖g‖`` (each computed once per curvature); a low
        bound only makes the test stricter.
        """
        # (H+εI)x into a buffer kept for this factorization's later checks (taken while in
        # use, so concurrent solves never share it): a fresh P-sized buffer per solve
        # costs page faults comparable to the sweeps of a deep one-sample MLP
        scratch, self._scratch = self._scratch, None
        if scratch is not None and scratch.shape != x.shape:
            scratch = None
        if scratch is None and not self._pooled_scratch:  # the first: from the workspace pool
            self._pooled_scratch = True
            scratch = workspace.empty(tuple(x.shape), x)
            workspace.recycle(self, scratch)
        # (the output-kernel route with its factor W kept: (WWᵀ + εI)x, two GEMMs)
        Mx = self._inner.apply(x, scratch) if isinstance(self._inner, routes.KernelRouteFactorization) else None
        if Mx is None:
            Mx = self._curvature._apply(x, scratch, shift=self.damping)
        residual = torch.sub(rhs, Mx, out=Mx)  # b − (H+εI)x, in the buffer of (H+εI)x
        r_n, x_n, b_n = torch.stack((residual.norm(dim=0), x.norm(dim=0), rhs.norm(dim=0))).tolist()
        checks = self._curvature.checks
        H_bound = max(checks.norm_bound, self._norm_hint)
        scale = max(0.0, H_bound - self.damping)  # ‖H+εI‖ ≥ ‖H‖ − ε
        for j in range(len(x_n)):
            if x_n[j] > 0:  # ‖(H+εI)x‖ ≥ ‖b‖ − ‖r‖ (one norm fewer than ‖(H+εI)x‖ itself)
                scale = max(scale, (b_n[j] - r_n[j]) / x_n[j])
        checks.raise_bound(max(H_bound, scale - abs(self.damping)))  # ‖(H+εI)x‖/‖x‖ ≤ ‖H‖ + |ε|

        def above(scale: float) -> bool:
            return any(
                scale * x_n[j] + b_n[j] > 0 and r_n[j] > tol * (scale * x_n[j] + b_n[j]) for j in range(len(x_n))
            ) or any(math.isnan(r) for r in r_n)

        if not above(scale):
            return None, residual, 0.0
        # the diagonal blocks of the last Linear layers: a few small products, once
        bound = checks.blocks_bound()
        if bound is not None:
            scale = max(scale, bound - abs(self.damping))
            if not above(scale):
                return None, residual, 0.0
        # the cheap bounds can be far below ‖H‖ (on deep tanh MLPs): before the first
        # refinement on this curvature, bound ‖H‖ by ‖Hg‖/‖g‖ (one HVP, once, cheaper than
        # the refinement's two sweeps it spares this and later solves)
        bound = checks.gradient_bound()
        if bound is not None:
            scale = max(scale, bound - abs(self.damping))
            if not above(scale):
                return None, residual, 0.0
        etas = [r_n[j] / (scale * x_n[j] + b_n[j]) for j in range(len(x_n)) if scale * x_n[j] + b_n[j] > 0]
        finite = all(math.isfinite(v) for v in r_n + x_n)
        eta = max(etas, default=math.inf) if finite else math.inf
        return residual, residual, eta

    # -- the spectrum's signs and log-determinant -----------------------------------------
    def _spectral_factorization(self, inertia_only: bool = False):
        """The factorization ``logdet``, ``sign`` and ``inertia`` read: the elimination's
        where its backward error passes :data:`FACTORIZATION_TOLERANCE`, else the pivoted
        KKT factorization (an :class:`~tallskinny.errors.AccuracyWarning` where that is too
        large to make or finds ``H + εI`` singular). Decided once. The Gauss–Newton matrix
        is not checked: its elimination is a block Cholesky of a positive semidefinite
        problem (every value Hessian ``S ⪰ 0`` and no larger than ``FᵀSF``), which has no
        element growth. ``inertia_only``: the inertia alone, exact where ``η·cond ≪ 1``,
        keeps the elimination without the log-determinant's stricter test (counts at
        shifts near the zero bulk, where ``cond`` is large, would otherwise all take the
        pivoted factorization: minutes on the digits demo's MLP)."""
        if self._spectral is not None:
            return self._spectral
        if self.precision == "mixed":
            self._to_full("logdet, sign and inertia are read from float64 factors")
        if self._curvature.kind == "ggn" or self._curvature.method != "riccati" or self._inner is self._pivoted:
            self._spectral = self._inner
            return self._spectral
        if self._error is None:
            self._error = self._factorization_error(self._inner)
        eta, cond = self._error
        tol = FACTORIZATION_TOLERANCE * torch.finfo(self._layout.dtype).eps
        P = self._layout.numel
        # the elimination stays where even a pessimistic condition number keeps the
        # inertia exact (η·cond ≪ 1) and, for logdet, the perturbation of log|det|
        # (≲ P·η·cond) inside the documented accuracy
        if inertia_only and eta > tol and eta * cond <= 1e-3:
            return self._inner  # (logdet may still take the pivoted factorization)
        self._spectral = self._inner
        if eta <= tol or P * eta * cond <= 1e-9 * max(1.0, abs(float(self._inner.logdet()))) and eta * cond <= 1e-3:
            return self._spectral
        why = None
        if not self._pivoted_fits():
            why = f"the pivoted fallback would need more than {PIVOTED_FALLBACK_BYTES / 2**30:g} GiB"
        elif self._pivoted is None:
            try:
                self._pivoted = self._pivoted_factorization()
            except SingularSystemError:
                why = "the pivoted fallback finds H + εI singular"
        if self._pivoted is not None:
            self._spectral = self._pivoted
        else:
            warnings.warn(
                f"the estimated backward error of the factorization of H + εI is {eta:.1e} "
                f"(tolerance {tol:.1e}) at damping={self.damping:g} and {why}: log|det| may be "
                "off by about P·η·cond(H + εI), and the inertia may miscount eigenvalues below "
                "η·‖H + εI‖",
                AccuracyWarning,
                stacklevel=3,
            )
        return self._spectral

    def _factorization_error(self, factorization) -> tuple[float, float]:
        """The normwise backward error ``η`` of ``factorization``'s solve of a fixed random
        right-hand side ``b`` (unrefined), an estimate of its factors' backward error, and
        a pessimistic estimate of ``cond(H + εI)`` from the same solve,
        ``10·√P·‖H+εI‖·‖x‖/‖b‖`` (``‖x‖/‖b‖ ≥ |vᵀb|/(|λ_min|·‖b‖)``, about
        ``1/(√P·|λ_min|)`` for a random ``b``; ``‖H+εI‖`` bounded from below by the check)."""
        layout = self._layout
        b = gaussian((layout.numel, 1), 0, layout.dtype, layout.device)
        x = factorization.solve(b)
        if not bool(torch.isfinite(x).all()):
            return math.inf, math.inf
        tol = FACTORIZATION_TOLERANCE * torch.finfo(x.dtype).eps
        _, buffer, eta = self._checked_residual(b, x, tol)
        self._scratch = buffer
        norm = self._curvature.checks.norm_bound + abs(self.damping)
        cond = 10 * math.sqrt(layout.numel) * norm * float(x.norm()) / float(b.norm())
        return eta, cond

    def _pivoted_fits(self) -> bool:
        """Whether the pivoted fallback's dense blocks fit in :data:`PIVOTED_FALLBACK_BYTES`
        and in the curvature's ``memory_limit``."""
        limit = self._curvature.memory_limit
        cap = PIVOTED_FALLBACK_BYTES if limit is None else min(PIVOTED_FALLBACK_BYTES, limit)
        return elimination.kkt_bytes(self._curvature.oracles) <= cap

    def _pivoted_factorization(self):
        curv = self._curvature
        return elimination.KKTFactorization(curv.oracles, curv.loss_oracle, self.damping)

    @collector_paused
    def logdet(self) -> Tensor:
        self._curvature._check_current()
        return self._spectral_factorization().logdet()

    @collector_paused
    def sign(self) -> Tensor:
        self._curvature._check_current()
        return self._spectral_factorization().sign()

    @collector_paused
    def inertia(self) -> Inertia:
        self._curvature._check_current()
        return self._spectral_factorization(inertia_only=True).inertia()

    @property
    def shift(self) -> float:
        """``σ`` of ``H − σI``: ``−damping``."""
        return -self.damping if self.damping != 0.0 else 0.0

    def is_positive_definite(self) -> bool:
        inertia = self.inertia()
        return inertia.negative == 0 and inertia.zero == 0


class Curvature:
    """The ε-independent derivative data at one point, computed once by ``Chain.curvature``.

    Holds the oracle and the adjoint ``g_l = ∂loss/∂z_l`` of every block (the gradient is
    ``Σ_l G_lᵀ g_l``, made on first request); ``hvp``, ``solve``, ``factorize`` and
    ``to_dense`` reuse them without going back to the model.

    The oracles share memory with the parameters (``nn.Linear``'s ``F`` is the weight
    itself), so ``versions`` (:class:`ParameterVersions`, recorded by ``Chain.curvature``)
    is checked first by every method of the curvature and of its factorizations: a
    parameter changed in place since raises :class:`~tallskinny.errors.StaleCurvatureError`.

    ``memory_limit`` (bytes, ``None``: the memory available at each call, ``float('inf')``:
    no check; given to ``Chain.curvature``, may be changed) bounds the estimated memory of
    ``factorize``, ``solve`` and ``to_dense``: a call whose estimate exceeds it raises
    :class:`~tallskinny.errors.ResourceError` before any work (:mod:`tallskinny.resources`).
    """

    def __init__(
        self,
        oracles: Sequence[Oracle],
        loss_oracle: Oracle,
        adjoints: Sequence[Tensor],
        layout: ParameterLayout,
        kind: str,
        loss_value: Tensor,
        versions: ParameterVersions | None = None,
        *,
        memory_limit: float | None = None,
        samples: int | None = None,
        names: Sequence[str] | None = None,
        method="riccati",
        preconditioner=None,
        pass_bytes: int | None = None,
    ):
        self._versions = versions
        self._memory_limit = check_memory_limit(memory_limit)
        self._samples = samples  # the batch size where every activation leads with it
        self._route_costs = routes.route_costs(
            [o.sizes for o in oracles], loss_oracle.F.shape[1], samples, kind, layout.dtype.itemsize
        )
        method, self._why, self._krylov = routes.resolve(method, self._route_costs, self._memory_limit)
        self.method = method  # the route this curvature's factorizations take
        self._preconditioner = preconditioner  # krylov: (sub-batch curvature, scale) or None
        self._route = None  # the kernel's SVD or the dense spectrum, made on first use
        self._dense_eigen = None  # the dense H's eigendecomposition, for singular verdicts
        self.spectrum_cache: dict = {}  # what tallskinny.spectrum learnt of H (‖H‖, bounds)
        self._block_names = tuple(names) if names is not None else tuple(f"block {i}" for i in range(len(oracles)))
        self._stage_shapes = None  # the stages' sizes for the memory estimates, made on first use
        self._estimates: dict = {}  # the factorization's memory estimates, by (prepared, KKT)
        self._pooled = layout.device.type == "cpu"  # the workspace pool holds CPU buffers only
        self.oracles = tuple(oracles)
        self.loss_oracle = loss_oracle
        self._adjoints = adjoints  # g_l = ∂loss/∂z_l of every block's output
        self._gradient = None  # Σ_l G_lᵀ g_l, made on first use
        self.layout = layout
        self.kind = kind
        self.loss = loss_value
        self._stages = None
        self._compiled = None
        self._low = None  # the float32 oracles and stages of mixed precision, made on first use
        self._float64 = None  # a float32 curvature's float64 copy, for the spectral queries
        self._pass_bytes = pass_bytes  # the curvature pass's memory estimate (the copy's bound)
        self._clip_verdict = None  # whether the copy's Λ is its semidefinite part, decided once
        #: the dtype the oracles were computed in (a float32 curvature's float64 copy:
        #: float32), whose rounding sets the width of the spectrum's zero bulk
        self.source_dtype = layout.dtype
        self.checks = SolveChecks(
            blocks=lambda: elimination.last_blocks_norm_bound(self._compiled_oracles()[0], self.loss_oracle.E.to_dense()),
            gradient=lambda: self._gradient_norm_bound(),
        )

    def _check_current(self) -> None:
        """The parameters are as when the curvature was made (else ``StaleCurvatureError``)."""
        if self._versions is not None:
            self._versions.check()

    @property
    def memory_limit(self) -> float | None:
        """The limit (bytes) of ``factorize``, ``solve`` and ``to_dense``; ``None``: the
        memory available at each call; ``float('inf')``: no check. Settable."""
        return self._memory_limit

    @memory_limit.setter
    def memory_limit(self, limit: float | None) -> None:
        self._memory_limit = check_memory_limit(limit)

    def _prepared_stages(self):
        """The ε-independent stage data of the elimination, computed on first use."""
        if self._stages is None:
            self._stages = elimination.prepare_stages(self.oracles, self.loss_oracle, self._compiled_oracles()[0])
        return self._stages

    def _compiled_oracles(self):
        """The oracles' products as tensor functions (shared by HVPs and the stages)."""
        if self._compiled is None:
            self._compiled = (elimination.compile_oracles(self.oracles), elimination.CompiledOracle(self.loss_oracle))
        return self._compiled

    def _gradient_norm_bound(self) -> float:
        """``‖Hg‖/‖g‖ ≤ ‖H‖₂`` for the gradient ``g`` (``0`` at a stationary point).

        A Rayleigh-type bound, good because ``g`` is not a random direction: ``g = Jᵀ∇ℓ``
        lies in the range of ``Jᵀ``, where the Gauss–Newton part, the largest curvature
        of a network, lives (so it is far above the bounds from the factorization's pivots
        and from the last Linear layers' diagonal blocks)."""
        g = self._flat_gradient().reshape(-1, 1)
        g_norm = float(g.norm())
        return float(self._apply(g).norm()) / g_norm if g_norm > 0 else 0.0

    @property
    def num_parameters(self) -> int:
        return self.layout.numel

    def gradient(self) -> Tensor:
        """The flat gradient ``(P,)`` of the loss."""
        self._check_current()
        return self._flat_gradient()

    def _flat_gradient(self) -> Tensor:
        if self._gradient is None:
            self._gradient = elimination.gradient(self._compiled_oracles()[0], self._adjoints)
        return self._gradient

    @collector_paused
    def hvp(self, v):
        """``H v`` (or ``G v`` for ``kind="ggn"``) in the format of ``v``.

        ``v`` must be finite; its autograd history is ignored (the result carries no
        graph). Zero vectors (``(P, 0)``) give an empty result."""
        self._check_current()
        x, fmt = self.layout.to_flat(v, "v")
        if x.shape[1] == 0:
            return self.layout.from_flat(x.new_zeros(x.shape), fmt)
        return self.layout.from_flat(self._apply(x), fmt)

    def _apply(self, x: Tensor, out: Tensor | None = None, shift: float = 0.0) -> Tensor:
        """``H x + shift·x`` for a validated flat ``(P, k)`` tensor (written into ``out``,
        of ``x``'s shape, where the products allow)."""
        return elimination.hvp(*self._compiled_oracles(), x, out, shift)

    @collector_paused
    def factorize(self, damping: float = 0.0, *, shift: float | None = None, precision: str = "full",
                  confirm_singular: bool = True) -> Factorization:
        """Factor ``H + damping·I`` (raises ``SingularSystemError`` if it is singular, and
        :class:`~tallskinny.errors.ResourceError`, before any work, where its estimated
        memory exceeds ``memory_limit``).

        ``shift=σ`` (any finite real, instead of a damping) factors ``H − σI``: its inertia
        counts the eigenvalues above and below ``σ`` (:mod:`tallskinny.spectrum`); the
        factorization's ``damping`` is then ``−σ``.

        ``precision`` (:data:`PRECISIONS`): ``"full"`` (the default), ``"mixed"`` (float32
        factors, float64 refinement; a float64 curvature on the ``riccati`` route only) or
        ``"auto"`` (mixed where it pays). The factorization's ``precision`` says which was
        taken; ``logdet``, ``sign`` and ``inertia`` of a mixed one first make the float64
        factorization (see :class:`Factorization`).

        ``confirm_singular=False``: where the elimination meets a singular stage, raise
        ``SingularSystemError`` at once instead of confirming it with the pivoted
        factorization, which tells a singular system from a regular one whose elimination
        broke down (for searches that move the shift on either way; the pivoted
        factorization forms every stage's dense KKT block, seconds for large models)."""
        self._check_current()
        precision = check_precision(precision)
        if not isinstance(confirm_singular, bool):
            raise TypeError(f"confirm_singular must be True or False, got {confirm_singular!r}")
        if shift is not None:
            shift = check_shift(shift)
            if damping != 0.0:
                raise ValueError(f"give damping or shift, not both (damping={damping!r}, shift={shift!r})")
            damping = -shift if shift != 0.0 else 0.0
        else:
            damping = check_damping(damping)
        self._check_factorization(damping)
        return self._factorize(damping, precision, confirm_singular)

    def _factorize(self, damping: float, precision: str = "full", confirm_singular: bool = True) -> Factorization:
        if self._mixed(precision):
            low = self._low_precision().factorize(damping)
            if low is not None:
                return Factorization(low, self, damping, "mixed")
            why = "a stage of the float32 elimination is singular to float32's working precision"
            return Factorization(self._factorize_inner(damping, confirm_singular), self, damping, fallback=why)
        return Factorization(self._factorize_inner(damping, confirm_singular), self, damping)

    def _mixed(self, precision: str) -> bool:
        """Whether ``precision`` factors in float32 here (``"mixed"`` where impossible raises)."""
        if precision == "full":
            return False
        possible = self.layout.dtype == torch.float64 and self.method == "riccati"
        if precision == "mixed" and not possible:
            raise ValueError(
                "precision='mixed' needs a float64 curvature on the riccati route, this one is "
                f"{self.layout.dtype} on the {self.method} route"
            )
        return possible and (precision == "mixed" or elimination.mixed.pays(self.oracles))

    def _low_precision(self):
        """The float32 copies of the oracles and their stages, made on first use."""
        if self._low is None:
            self._low = elimination.mixed.LowPrecisionStages(self.oracles, self.loss_oracle)
        return self._low

    def _factorize_inner(self, damping: float, confirm_singular: bool = True):
        """The factorization of ``H + εI`` in the curvature's dtype, on its route."""
        if self.method == "riccati":
            try:
                inner = elimination.factorize(self.oracles, self.loss_oracle, damping, self._prepared_stages(),
                                              confirm_singular=confirm_singular)
            except SingularSystemError as verdict:
                if not confirm_singular or not self._dense_verdict_fits():
                    raise
                try:  # the dense eigenvalues overturn a breakdown on a regular system
                    inner = self._dense_spectrum().factorize(damping)
                except SingularSystemError:
                    raise verdict from None
        elif self.method == "krylov":
            inner = routes.krylov.make_factorization(
                lambda x: self._apply(x, shift=damping), damping, self._krylov, self.kind, self.layout.numel,
                self.layout.dtype, self._preconditioner,
            )
        else:
            inner = self._spectral_route().factorize(damping)
        return inner

    def _dense_verdict_fits(self) -> bool:
        P = self.layout.numel
        limit = self.memory_limit
        return P <= DENSE_VERDICT_PARAMETERS and (limit is None or 3 * P * P * self.layout.dtype.itemsize <= limit)

    def _dense_spectrum(self):
        """The eigendecomposition of the dense ``H`` (:class:`~tallskinny.routes.DenseSpectrum`), made once."""
        if self._dense_eigen is None:
            self._dense_eigen = routes.DenseSpectrum(self._dense())
        return self._dense_eigen

    # -- spectral queries by inertia (tallskinny.spectrum) --------------------------------------
    def spectral_curvature(self) -> "Curvature":
        """The curvature the spectral queries below run on: this one where it is float64,
        else a float64 copy of its oracles (made once; twice their memory, checked against
        ``memory_limit`` as twice the curvature pass's estimate): the same matrix, whose
        counts and eigenpairs are then exact to float64's precision. In float32 the counts'
        edge tolerance ``τ ≈ 1e3·P·eps·‖H‖`` is a tenth of ``‖H‖`` at ``P ≈ 1 000``, too
        coarse to certify an eigenvalue. (The Krylov route, inexact anyway, stays in its
        dtype.)"""
        if self.layout.dtype == torch.float64 or self.method == "krylov":
            return self
        if self._float64 is None:
            if self._pass_bytes is not None:  # the copy: at most the pass's bytes, doubled
                a = self.loss_oracle.E.shape[0]
                terms = [("the oracles in float64", 2 * self._pass_bytes)]
                if self._clips_loss_hessian():  # Λ, its eigenvectors and their product in float64
                    terms.append(("the loss Hessian's semidefinite part", 4 * a * a * 8))
                resources.require(
                    MemoryEstimate.of(terms), self.memory_limit, self.layout.device,
                    what="the float64 copy of a float32 curvature (spectral queries)",
                )
            f64 = torch.float64
            self._float64 = Curvature(
                [o.astype(f64) for o in self.oracles], self._float64_loss_oracle(),
                [g.to(f64) for g in self._adjoints], attrs.evolve(self.layout, dtype=f64), self.kind,
                self.loss.to(f64), self._versions, samples=self._samples, names=self._block_names, method=self.method,
            )
            self._float64.source_dtype = self.layout.dtype
        self._float64.memory_limit = self.memory_limit
        return self._float64

    def _clips_loss_hessian(self) -> bool:
        """Whether the float64 copy's loss Hessian is ``Λ``'s semidefinite part: a
        Gauss–Newton matrix on the kernel or dense route (both factor ``Λ = BBᵀ``) with a
        dense ``Λ`` that this curvature's own check takes as semidefinite."""
        if self.kind != "ggn" or self.method not in ("kernel", "dense") or not isinstance(self.loss_oracle.E, Dense):
            return False  # (a diagonal Λ of a float32 loss, MSE's, has no rounding negatives)
        if self._clip_verdict is None:
            E = self.loss_oracle.E.to_dense()
            try:
                if routes.loss_factor_blocks(E, self._samples or 1) is None:
                    routes.loss_factor(E)  # (samples that interact: the whole Λ)
                self._clip_verdict = True
            except ValueError:  # a loss not convex in the output: Λ as it is (the route says so)
                self._clip_verdict = False
        return self._clip_verdict

    def _float64_loss_oracle(self) -> Oracle:
        """The loss oracle in float64: ``Λ`` exactly, but where :meth:`_clips_loss_hessian`,
        whose negative eigenvalues (rounding, by this curvature's own check) are set to zero
        (:func:`tallskinny.routes.semidefinite_part`): a float32 ``Λ`` is semidefinite to
        float32's rounding only, and the float64 copy's route would refuse it."""
        o = self.loss_oracle
        f64 = torch.float64
        if not self._clips_loss_hessian():
            return o.astype(f64)
        E = routes.semidefinite_part(o.E.to_dense(), self._samples or 1, f64)
        return Oracle(G=o.G.astype(f64), F=o.F.astype(f64), A=o.A.astype(f64), C=o.C.astype(f64), E=Dense(E))

    def eigenvalue_count(self, lower: float, upper: float) -> int:
        """The exact number of eigenvalues in ``[lower, upper)`` (:func:`tallskinny.spectrum.eigenvalue_count`)."""
        self._check_current()
        return spectrum.eigenvalue_count(self.spectral_curvature(), lower, upper)

    def negative_count(self, threshold: float | None = None) -> int:
        """The number of eigenvalues below ``−threshold`` (:func:`tallskinny.spectrum.negative_count`)."""
        self._check_current()
        return spectrum.negative_count(self.spectral_curvature(), threshold)

    def eigvalsh(self, k: int, which: str = "largest", *, near: float | None = None, eigenvectors: bool = False):
        """``k`` eigenvalues (and vectors) to full precision (:func:`tallskinny.spectrum.eigvalsh`),
        in the curvature's dtype (computed in float64: :meth:`spectral_curvature`)."""
        self._check_current()
        out = spectrum.eigvalsh(self.spectral_curvature(), k, which, near=near, eigenvectors=eigenvectors)
        dtype = self.layout.dtype
        return tuple(t.to(dtype) for t in out) if eigenvectors else out.to(dtype)

    def spectral_histogram(self, edges, *, zero: float | None = None, progress=None):
        """Exact counts per bin (:func:`tallskinny.spectrum.spectral_histogram`)."""
        self._check_current()
        return spectrum.spectral_histogram(self.spectral_curvature(), edges, zero=zero, progress=progress)

    def _spectral_route(self):
        """The ε-independent part of the kernel or dense route, made on first use."""
        if self._route is None:
            if self.method == "kernel":
                self._route = routes.OutputKernel(
                    self._compiled_oracles()[0], self.oracles, self.loss_oracle.E.to_dense(), self.layout.numel,
                    self._samples,
                )
            elif self.kind == "ggn":
                W = self._output_factor()
                self._route = routes.DenseSpectrum(W @ W.mT)
            else:
                self._route = routes.DenseSpectrum(self._dense())
        return self._route

    def _output_factor(self) -> Tensor:
        """``W = Jᵀ B`` with ``G = W Wᵀ`` (:func:`tallskinny.routes.output_factor`)."""
        blocks, oracles = self._compiled_oracles()[0], self.oracles
        E = self.loss_oracle.E.to_dense()
        B_s = routes.loss_factor_blocks(E, self._samples or 1)
        W = routes.per_sample_factor(blocks, oracles, B_s, self.layout.numel) if B_s is not None else None
        if W is None:
            W = routes.adjoint(blocks, routes.output_loss_factor(E, self._samples, B_s), self.layout.numel)
        return W

    def explain(self) -> str:
        """The estimated cost of every route for this curvature and why :attr:`method` was
        taken (:mod:`tallskinny.routes.planner`)."""
        return routes.explain(self._route_costs, self.method, self._why)

    def _stage_plan(self) -> list:
        """The stages' :class:`~tallskinny.resources.StageShape` (made once)."""
        if self._stage_shapes is None:
            self._stage_shapes = resources.stage_shapes(self.oracles, self._compiled_oracles()[0], self._block_names)
        return self._stage_shapes

    def elimination_flops(self, columns: int = 1) -> elimination.EliminationFlops:
        """The floating-point operations of the Riccati elimination: one factorization
        at a damping ``ε ≠ 0`` (the stages prepared) and a solve of ``columns``
        right-hand sides, stage by stage, as the engine runs them and as a lower bound
        (:mod:`tallskinny.elimination.flops`). Prepares the stages where not done yet."""
        return elimination.stage_flops(self._prepared_stages(), columns=columns, cholesky=self.kind == "ggn")

    def factorization_memory(self, damping: float = 0.0) -> MemoryEstimate:
        """The estimated peak of the new allocations of :meth:`factorize` at this damping
        (:mod:`tallskinny.resources`; at ``damping = 0`` it includes the pivoted KKT system
        where a stage is singular there). Shape arithmetic only."""
        return self._factorization_estimate(check_damping(damping) == 0.0)

    def _factorization_estimate(self, at_zero: bool) -> MemoryEstimate:
        stages = self._stage_plan()
        kkt = at_zero and any(s.complement for s in stages)
        key = (self._stages is not None, kkt)
        estimate = self._estimates.get(key)
        if estimate is None:
            estimate = self._estimates[key] = self._estimate(stages, prepared=key[0], kkt=kkt)
        return estimate

    def _estimate(self, stages, *, prepared: bool, kkt: bool) -> MemoryEstimate:
        return resources.factorization_estimate(
            stages, prepared=prepared, kkt=kkt, itemsize=self.layout.dtype.itemsize, pooled=self._pooled
        )

    def _check_factorization(self, damping: float, columns: int = 0) -> None:
        """Refuse ``factorize(damping)`` (and a solve of ``columns`` right-hand sides after it)
        where the estimate exceeds the limit."""
        if self.method == "riccati":
            estimate = self._factorization_estimate(damping == 0.0)
        elif self.method == "krylov":
            nbytes = routes.krylov.memory_bytes(self.layout.numel, columns, self.layout.dtype.itemsize)
            estimate = resources.MemoryEstimate.of([("the krylov route's vectors", nbytes)])
        else:
            cost = next(c for c in self._route_costs if c.name == self.method)
            estimate = resources.MemoryEstimate.of([(f"the {self.method} route's factors", int(cost.bytes))])
        what = f"factorize(damping={damping:g})"
        if columns:
            estimate += resources.solve_estimate(self.layout.numel, columns, self.layout.dtype.itemsize)
            what = f"solve(damping={damping:g})"
        resources.require(
            estimate, self.memory_limit, self.layout.device, what=what,
            advice=lambda limit: self._factorization_advice(damping, limit, columns),
        )

    def _check_solve(self, columns: int, mixed: bool = False) -> None:
        """Refuse a solve of ``columns`` right-hand sides that would not fit (``mixed``:
        with the GMRES refinement's vectors)."""
        steps = GMRES_STEPS if mixed else 0
        if resources.fits(self._solve_bytes(columns, steps), self._memory_limit):
            return  # (every solve: no estimate made)
        one = self._solve_bytes(1, steps)
        resources.require(
            resources.solve_estimate(self.layout.numel, columns, self.layout.dtype.itemsize, steps),
            self.memory_limit, self.layout.device, what="solve",
            advice=lambda limit: [f"at most {int(limit // one)} right-hand sides at a time fit"],
        )

    def _gmres_fits(self, columns: int) -> bool:
        """Whether a full-precision solve's GMRES rescue (:data:`RESCUE_STEPS`) fits the
        memory limit (else a stalled refinement goes on as without it)."""
        return resources.fits(self._solve_bytes(columns, GMRES_STEPS), self._memory_limit)

    def _solve_bytes(self, columns: int, gmres_steps: int = 0) -> int:
        """:func:`resources.solve_bytes` of this curvature's parameters and dtype."""
        return resources.solve_bytes(self.layout.numel, columns, self.layout.dtype.itemsize, gmres_steps)

    def _factorization_advice(self, damping: float, limit: float, columns: int = 0) -> list[str]:
        """What would fit: a smaller batch, the Gauss–Newton matrix, a damping > 0, fewer
        right-hand sides at a time."""
        stages, prepared = self._stage_plan(), self._stages is not None
        kkt = damping == 0.0 and any(s.complement for s in stages)
        P, itemsize = self.layout.numel, self.layout.dtype.itemsize
        solve = resources.solve_bytes(P, columns, itemsize)  # the same at every batch size
        out = []
        B = self._samples if solve < limit else None  # (no batch fits the solve's vectors)
        if B is not None:
            def at(b: int) -> int:
                return self._estimate([s.batch(b, B) for s in stages], prepared=False, kkt=kkt).total + solve

            out.append(resources.batch_advice(at, B, limit))
        if self.kind == "hessian":
            ggn = self._estimate([s.gauss_newton() for s in stages], prepared=False, kkt=kkt).total + solve
            out.append(f"kind='ggn' needs about {format_bytes(ggn)}")
        if kkt:
            riccati = self._estimate(stages, prepared=prepared, kkt=False).total + solve
            out.append(
                f"a damping > 0 needs about {format_bytes(riccati)} (at damping=0 a singular stage sends the "
                "factorization to the pivoted KKT system)"
            )
        room = limit - self._factorization_estimate(damping == 0.0).total
        if columns > 1 and room > 0:
            out.append(f"at most {int(room // resources.solve_bytes(P, 1, itemsize))} right-hand sides at a time fit")
        return out

    @collector_paused
    def solve(self, b, damping: float = 0.0, *, refine: int | None = None, precision: str = "full"):
        """``(H + damping·I)^{-1} b`` in the format of ``b`` (see :meth:`Factorization.solve`;
        zero right-hand sides return an empty result without a factorization).

        ``precision`` as for :meth:`factorize`; ``"auto"`` takes ``"full"`` where ``refine``
        is given (a fixed number of refinements asks for the full-precision factors)."""
        self._check_current()
        damping = check_damping(damping)
        check_refine(refine)
        precision = check_precision(precision)
        if precision == "auto" and refine is not None:
            precision = "full"
        rhs, fmt = self.layout.to_flat(b, "b")  # validate before any work
        if rhs.shape[1] == 0:
            return self.layout.from_flat(rhs.new_zeros(rhs.shape), fmt)
        self._check_factorization(damping, columns=rhs.shape[1])  # the factorization and the solve
        return self._factorize(damping, precision)._solve(rhs, fmt, refine)

    @collector_paused
    def to_dense(self) -> Tensor:
        """The ``P × P`` matrix (for checks on small models; refused before any work, with
        :class:`~tallskinny.errors.ResourceError`, where its estimated memory exceeds
        ``memory_limit``)."""
        self._check_current()
        P = self.layout.numel
        itemsize = self.layout.dtype.itemsize
        sizes = [o.sizes for o in self.oracles]
        estimate = resources.dense_estimate(P, [s[1] for s in sizes], [s[2] for s in sizes], itemsize)
        resources.require(
            estimate, self.memory_limit, self.layout.device, what="Curvature.to_dense",
            advice=lambda limit: [
                f"at most {resources.format_count(math.isqrt(int(limit // (3 * itemsize))))} parameters fit; "
                "hvp, factorize and solve work without the dense matrix"
            ],
        )
        return self._dense()

    def _dense(self) -> Tensor:
        P = self.layout.numel
        eye = torch.eye(P, dtype=self.layout.dtype, device=self.layout.device)
        H = self._apply(eye)
        if H.untyped_storage().data_ptr() == eye.untyped_storage().data_ptr():
            return 0.5 * (H + H.mT)
        # (H + Hᵀ)/2 into the identity's buffer, no longer needed: no third P × P matrix
        return torch.add(H, H.mT, out=eye).mul_(0.5)
