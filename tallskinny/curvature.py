"""The curvature of a chain's loss at one point: ``H`` (or the Gauss–Newton ``G``) as
the list of per-block oracles, with products, solves, log-determinants and inertia."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import torch
from torch import Tensor

from . import _workspace, elimination, products, resources
from ._gc import collector_paused
from .blocks.protocol import Oracle
from .errors import AccuracyWarning, SingularSystemError
from .linalg import Inertia
from .resources import MemoryEstimate, check_memory_limit, format_bytes
from .vectors import ParameterLayout

KINDS = ("hessian", "ggn")

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
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        if isinstance(damping, Tensor) and damping.dim() == 0 and damping.dtype.is_floating_point:
            damping = float(damping)
        else:
            raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    damping = float(damping)
    if math.isnan(damping) or math.isinf(damping):
        raise ValueError(f"damping must be finite, got {damping}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    return damping


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


class Factorization:
    """``H + εI`` factored once; solves any number of right-hand sides.

    ``logdet()`` is ``log|det(H + εI)|``, ``sign()`` the sign of the determinant and
    ``inertia()`` the counts ``(positive, negative, zero)`` of eigenvalues of ``H + εI``.
    """

    def __init__(self, inner, curvature: "Curvature", damping: float):
        self._inner = inner
        self._curvature = curvature
        self._layout = curvature.layout
        self.damping = damping
        self._scratch = None  # the buffer of the last check's (H+εI)x, reused by the next
        self._pooled_scratch = False  # whether a check buffer came from the workspace pool

    @collector_paused
    def solve(self, b, *, refine: int | None = None):
        """``(H + εI)^{-1} b`` in the format of ``b`` (flat or per-parameter, one or k columns).

        A step of iterative refinement is ``x ← x + F⁻¹(b − (H+εI)x)``: one exact HVP
        (through the oracles) and one more pair of sweeps. ``refine=None`` (the default)
        checks the solution instead of guessing: it computes the residual with one HVP,
        estimates the normwise backward error ``η = ‖r‖ / (‖H+εI‖·‖x‖ + ‖b‖)`` (with a lower
        bound of ``‖H+εI‖``, so that ``η`` is overestimated, never under)
        and, where ``η`` exceeds ``BACKWARD_ERROR_TOLERANCE·eps``, refines with that
        residual and checks again, at most ``MAX_REFINEMENTS`` times (an
        :class:`~tallskinny.errors.AccuracyWarning` if ``η`` is still above). The
        elimination does not pivot across blocks, so at small damping its backward error
        can reach 1e-10 on some right-hand sides; one step usually brings it back to
        rounding level. ``0`` never refines (no HVP), ``k`` always refines ``k`` times.
        """
        if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 0):
            raise ValueError(f"refine must be None or an integer >= 0, got {refine!r}")
        rhs, fmt = self._layout.to_flat(b, "b")
        self._curvature._check_solve(rhs.shape[1])
        x = self._inner.solve(rhs)
        if refine is None:
            # LAPACK's rule (xGERFS): refine while above tolerance and each step at least
            # halves the backward error, at most MAX_REFINEMENTS steps
            last = math.inf
            for step in range(MAX_REFINEMENTS + 1):
                residual, buffer, eta = self._checked_residual(rhs, x)
                go_on = residual is not None and step < MAX_REFINEMENTS and eta <= 0.5 * last
                if go_on:
                    self._curvature._refinements += 1
                    x = x + self._inner.solve(residual)
                self._scratch = buffer  # free again for the next check
                if not go_on:
                    break
                last = eta
            tol = BACKWARD_ERROR_TOLERANCE * torch.finfo(x.dtype).eps
            if residual is not None and eta > WARNING_FACTOR * tol:
                warnings.warn(
                    f"the estimated backward error of the solution is {eta:.1e} after {step} "
                    f"refinements (tolerance {tol:.1e}): H + εI is too ill-conditioned for the "
                    f"elimination at damping={self.damping:g}",
                    AccuracyWarning,
                    stacklevel=2,
                )
        else:
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

    def _checked_residual(self, rhs: Tensor, x: Tensor) -> tuple[Tensor | None, Tensor, float]:
        """The residual ``b − (H+εI)x`` if the backward error of ``x`` is above tolerance
        (else ``None``), the buffer it is made in (for the next check) and the largest
        estimated backward error of a column.

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
            scratch = _workspace.empty(tuple(x.shape), x)
            _workspace.recycle(self, scratch)
        Mx = self._curvature._apply(x, scratch, shift=self.damping)
        residual = torch.sub(rhs, Mx, out=Mx)  # b − (H+εI)x, in the buffer of (H+εI)x
        r_n, x_n, b_n = torch.stack((residual.norm(dim=0), x.norm(dim=0), rhs.norm(dim=0))).tolist()
        curv = self._curvature
        H_bound = max(curv._norm_bound, getattr(self._inner, "norm_lower_bound", 0.0))
        scale = max(0.0, H_bound - self.damping)  # ‖H+εI‖ ≥ ‖H‖ − ε
        for j in range(len(x_n)):
            if x_n[j] > 0:  # ‖(H+εI)x‖ ≥ ‖b‖ − ‖r‖ (one norm fewer than ‖(H+εI)x‖ itself)
                scale = max(scale, (b_n[j] - r_n[j]) / x_n[j])
        curv._norm_bound = max(H_bound, scale - self.damping)
        tol = BACKWARD_ERROR_TOLERANCE * torch.finfo(x.dtype).eps

        def above(scale: float) -> bool:
            return any(
                scale * x_n[j] + b_n[j] > 0 and r_n[j] > tol * (scale * x_n[j] + b_n[j]) for j in range(len(x_n))
            )

        if not above(scale):
            return None, residual, 0.0
        if not curv._block_bound_done:
            # the diagonal blocks of the last Linear layers: a few small products, once
            curv._block_bound_done = True
            bound = products.last_blocks_norm_bound(curv._compiled_oracles()[0], curv.loss_oracle.E.to_dense())
            curv._norm_bound = max(curv._norm_bound, bound)
            scale = max(scale, bound - self.damping)
            if not above(scale):
                return None, residual, 0.0
        if not curv._gradient_bound_done:
            # the cheap bounds can be far below ‖H‖ (20–40× on deep tanh MLPs): before the
            # first refinement on this curvature, bound ‖H‖ by ‖Hg‖/‖g‖ (one HVP, once; it
            # costs less than the refinement's two sweeps — measured 0.4–0.6× at one sample
            # through batched runs, 0.35× at four samples — and spares this and every later
            # solve a refinement that the cheap bounds alone would ask for)
            curv._gradient_bound_done = True
            bound = curv._gradient_norm_bound()
            curv._norm_bound = max(curv._norm_bound, bound)
            scale = max(scale, bound - self.damping)
            if not above(scale):
                return None, residual, 0.0
        eta = max(r_n[j] / (scale * x_n[j] + b_n[j]) for j in range(len(x_n)) if scale * x_n[j] + b_n[j] > 0)
        return residual, residual, eta

    @collector_paused
    def logdet(self) -> Tensor:
        return self._inner.logdet()

    def sign(self) -> Tensor:
        return self._inner.sign()

    @collector_paused
    def inertia(self) -> Inertia:
        return self._inner.inertia()

    def is_positive_definite(self) -> bool:
        inertia = self.inertia()
        return inertia.negative == 0 and inertia.zero == 0


class Curvature:
    """The ε-independent derivative data at one point, computed once by ``Chain.curvature``.

    Holds the oracle and the adjoint ``g_l = ∂loss/∂z_l`` of every block (the gradient is
    ``Σ_l G_lᵀ g_l``, made on first request); ``hvp``, ``solve``, ``factorize`` and
    ``to_dense`` reuse them without going back to the model.

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
        *,
        memory_limit: float | None = None,
        samples: int | None = None,
        names: Sequence[str] | None = None,
    ):
        self._memory_limit = check_memory_limit(memory_limit)
        self._samples = samples  # the batch size where every activation leads with it
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
        self._norm_bound = 0.0  # max ‖H v‖/‖v‖ over the vectors seen so far: a lower bound of ‖H‖
        self._gradient_bound_done = False  # whether ‖Hg‖/‖g‖ is in _norm_bound
        self._block_bound_done = False  # whether the last Linear blocks' ‖H_ll‖ is in it
        self._refinements = 0  # solves the check refined

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
            self._compiled = (products.compile_oracles(self.oracles), products.CompiledOracle(self.loss_oracle))
        return self._compiled

    def _gradient_norm_bound(self) -> float:
        """``‖Hg‖/‖g‖ ≤ ‖H‖₂`` for the gradient ``g`` (``0`` at a stationary point).

        A Rayleigh-type bound, good because ``g`` is not a random direction: ``g = Jᵀ∇ℓ``
        lies in the range of ``Jᵀ``, where the Gauss–Newton part, the largest curvature
        of a network, lives (measured: 0.6·‖H‖ on the benchmark MLPs, against 0.05·‖H‖
        from the factorization's pivots and ~0.1·‖H‖ from the last Linear layers'
        diagonal blocks)."""
        g = self.gradient().reshape(-1, 1)
        g_norm = float(g.norm())
        return float(self._apply(g).norm()) / g_norm if g_norm > 0 else 0.0

    @property
    def num_parameters(self) -> int:
        return self.layout.numel

    def gradient(self) -> Tensor:
        """The flat gradient ``(P,)`` of the loss."""
        if self._gradient is None:
            self._gradient = products.gradient(self._compiled_oracles()[0], self._adjoints)
        return self._gradient

    @collector_paused
    def hvp(self, v):
        """``H v`` (or ``G v`` for ``kind="ggn"``) in the format of ``v``."""
        x, fmt = self.layout.to_flat(v, "v")
        return self.layout.from_flat(self._apply(x), fmt)

    def _apply(self, x: Tensor, out: Tensor | None = None, shift: float = 0.0) -> Tensor:
        """``H x + shift·x`` for a validated flat ``(P, k)`` tensor (written into ``out``,
        of ``x``'s shape, where the products allow)."""
        return products.hvp(*self._compiled_oracles(), x, out, shift)

    @collector_paused
    def factorize(self, damping: float = 0.0) -> Factorization:
        """Factor ``H + damping·I`` (raises ``SingularSystemError`` if it is singular, and
        :class:`~tallskinny.errors.ResourceError`, before any work, where its estimated
        memory exceeds ``memory_limit``)."""
        damping = check_damping(damping)
        self._check_factorization(damping)
        inner = elimination.factorize(self.oracles, self.loss_oracle, damping, self._prepared_stages())
        return Factorization(inner, self, damping)

    def _stage_plan(self) -> list:
        """The stages' :class:`~tallskinny.resources.StageShape` (made once)."""
        if self._stage_shapes is None:
            self._stage_shapes = resources.stage_shapes(self.oracles, self._compiled_oracles()[0], self._block_names)
        return self._stage_shapes

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
        estimate = self._factorization_estimate(damping == 0.0)
        what = f"factorize(damping={damping:g})"
        if columns:
            estimate += resources.solve_estimate(self.layout.numel, columns, self.layout.dtype.itemsize)
            what = f"solve(damping={damping:g})"
        resources.require(
            estimate, self.memory_limit, self.layout.device, what=what,
            advice=lambda limit: self._factorization_advice(damping, limit, columns),
        )

    def _check_solve(self, columns: int) -> None:
        """Refuse a solve of ``columns`` right-hand sides that would not fit."""
        P, itemsize = self.layout.numel, self.layout.dtype.itemsize
        if resources.fits(resources.solve_bytes(P, columns, itemsize), self._memory_limit):
            return  # (every solve: no estimate made)
        one = resources.solve_bytes(P, 1, itemsize)
        resources.require(
            resources.solve_estimate(P, columns, itemsize), self.memory_limit, self.layout.device, what="solve",
            advice=lambda limit: [f"at most {int(limit // one)} right-hand sides at a time fit"],
        )

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
    def solve(self, b, damping: float = 0.0, *, refine: int | None = None):
        """``(H + damping·I)^{-1} b`` in the format of ``b`` (see :meth:`Factorization.solve`)."""
        damping = check_damping(damping)
        rhs, _ = self.layout.to_flat(b, "b")  # validate before any work
        self._check_factorization(damping, columns=rhs.shape[1])  # the factorization and the solve
        return self.factorize(damping).solve(b, refine=refine)

    @collector_paused
    def to_dense(self) -> Tensor:
        """The ``P × P`` matrix (for checks on small models; refused before any work, with
        :class:`~tallskinny.errors.ResourceError`, where its estimated memory exceeds
        ``memory_limit``)."""
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
        eye = torch.eye(P, dtype=self.layout.dtype, device=self.layout.device)
        H = self._apply(eye)
        if H.untyped_storage().data_ptr() == eye.untyped_storage().data_ptr():
            return 0.5 * (H + H.mT)
        # (H + Hᵀ)/2 into the identity's buffer, no longer needed: no third P × P matrix
        return torch.add(H, H.mT, out=eye).mul_(0.5)
