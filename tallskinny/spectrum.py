"""Exact spectral queries by Sylvester's law of inertia.

The number of eigenvalues of ``H`` below ``σ`` is the negative count of the inertia of
``H − σI``: one factorization (``Curvature.factorize(shift=σ)``), exact wherever the
factorization's backward error is below the distance of ``σ`` to the spectrum (every
route checks it, see docs/chain.md, Accuracy). On that:

* :func:`eigenvalue_count` — the exact number of eigenvalues in ``[lower, upper)``;
* :func:`eigvalsh` — ``k`` eigenvalues (largest, smallest or nearest a value), to full
  precision, and their eigenvectors: a certified bound of the spectrum by counts, then
  block shift-invert Lanczos with the factorization at the target, Rayleigh quotients by
  HVPs for the digits, and a final count that proves none was missed (repeated
  eigenvalues: the search goes on with fresh directions until the count is met);
* :func:`spectral_histogram` — exact counts per bin, one factorization per edge, the
  bulk of (numerically) zero eigenvalues reported apart; :func:`symlog_edges` gives bins
  whose edges stay clear of that bulk;
* :func:`slq` — stochastic Lanczos quadrature, the approximate density it is compared with.

**Edges.** ``H − σI`` is singular where ``σ`` is an eigenvalue (to rounding). A count at
such an edge is taken at ``σ − τ`` instead, with ``τ = edge_tolerance(curv)`` (about
``1e3·c·P·eps·‖H‖``, ``‖H‖`` estimated by ``‖Hg‖/‖g‖``): an eigenvalue within ``τ`` of an edge counts as equal to it — in
``[lower, upper)`` it is in where at ``lower``, out where at ``upper``. The parameter
blocks' null space gives a Hessian many exact zeros (and a Gauss–Newton matrix ``P − r``),
so ``σ = 0`` is always such an edge: "the number of negative eigenvalues" is the count
below ``−τ`` (:func:`negative_count`), eigenvalues in ``[−τ, τ)`` are the zero bulk.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .errors import ConvergenceError, SingularSystemError, real_number
from .linalg import pivot_tolerance

__all__ = [
    "SLQ",
    "Histogram",
    "edge_tolerance",
    "eigenvalue_count",
    "eigvalsh",
    "kato_temple_bounds",
    "negative_count",
    "plot_histogram",
    "slq",
    "spectral_bounds",
    "spectral_histogram",
    "symlog_edges",
    "zero_tolerance",
]

WHICH = ("largest", "smallest", "nearest")


RESIDUAL_TOLERANCE = 1e-11
"""An eigenpair is accepted where ``‖Hy − λy‖ ≤ RESIDUAL_TOLERANCE·‖H‖`` (``‖y‖ = 1``):
its eigenvalue is then exact to ``‖r‖²/gap`` and to the backward error ``‖r‖``."""
STALLED_RESIDUAL_TOLERANCE = 1e-10
"""The last resort of a model above ``DENSE_FALLBACK_MAX_P`` parameters: a shift-invert
search that would end in ``ConvergenceError`` (its Krylov space stopped growing, or it ran
out of block steps) returns instead the best pairs it met with residuals ``‖Hy − λy‖ ≤``
this ``·‖H‖`` (the accuracy the tests and the fuzzer hold ``eigvalsh`` to; values then
exact to ``‖r‖²/gap``), still certified by the counts. Inverse iteration stalls above
``RESIDUAL_TOLERANCE`` where the pole cannot separate a wanted pair from the eigenvalues
beside it (``|λ − σ|/|μ − σ| ≈ 1``: a pole beyond the spectrum and small eigenvalues next
to a null space). Smaller models take the exact dense fallback instead."""
VALUE_TOLERANCE = 1e-13
"""Without eigenvectors, the extreme eigenvalues are accepted where their Kato–Temple
bound ``‖r‖²/gap`` (``gap`` certified by a count) is ``≤ VALUE_TOLERANCE·‖H‖``."""
MAX_BLOCKS = 60
"""Block shift-invert Lanczos steps before a search gives up (the dense fallback, the
stalled pairs of :data:`STALLED_RESIDUAL_TOLERANCE`, or
:class:`~tallskinny.errors.ConvergenceError`: see :func:`eigvalsh`)."""
REORTHOGONALIZE_BELOW = 2**-0.5
"""Both Lanczos iterations (on ``H`` after its three-term step, and shift-invert)
orthogonalize a vector or block against the basis a second time only where a column
kept less than this fraction of its norm in the first pass (Daniel, Gragg, Kaufman
and Stewart's criterion, which bounds the loss of orthogonality of one classical
Gram–Schmidt pass; a looser fraction lets the loss build up until a nearly invariant
block destroys the basis). The basis stays orthogonal to ~1e-13 (~1e-11 at worst near a
null space), not to rounding: the Ritz vectors read from it are orthonormalized again
(:func:`_ritz_pairs`)."""
EDGE_RETRIES = 6


# -- norms and counts ----------------------------------------------------------------------
def _norm_estimate(curv) -> float:
    """An estimate of ``‖H‖`` for the rounding tolerance of the edges: ``‖Hg‖/‖g‖`` for the
    gradient ``g`` (one HVP; ~0.6·‖H‖ on tanh MLPs, where the Gauss–Newton part lives),
    or 4 Lanczos steps where it fails (a stationary point); made once per curvature."""
    cached = curv.spectrum_cache
    if "norm" not in cached:
        g = curv.gradient().reshape(-1, 1)
        g_norm = float(g.norm())
        est = float(curv.hvp(g).norm()) / g_norm if g_norm > 0 else 0.0
        if not est > 0:
            P = curv.num_parameters
            gen = torch.Generator().manual_seed(0)
            v = torch.randn((P, 1), generator=gen, dtype=curv.layout.dtype).to(curv.layout.device)
            theta, _, _ = _lanczos_extremes(curv, v, min(4, P))
            est = max(abs(theta[0]), abs(theta[-1]))
        cached["norm"] = est
    return cached["norm"]


def _lanczos_extremes(curv, v: Tensor, steps: int):
    """Ritz values (ascending), their residual norms and vectors after ``steps`` Lanczos
    steps on ``H`` with full reorthogonalization."""
    V = [v / v.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = curv.hvp(V[-1])
        size = float(w.norm())  # ‖Hv‖: the breakdown test is relative (scale-free)
        a = float((V[-1].mT @ w).squeeze())
        Vm = torch.cat(V, dim=1)
        w = w - Vm @ (Vm.mT @ w)
        w = w - Vm @ (Vm.mT @ w)
        alphas.append(a)
        b = float(w.norm())
        if j == steps - 1 or b <= 1e-14 * size:
            betas.append(b)
            break
        betas.append(b)
        V.append(w / b)
    m = len(alphas)
    T = _tridiagonal(alphas, betas)
    theta, S = torch.linalg.eigh(T)
    res = (betas[m - 1] * S[-1].abs()).tolist()
    return theta.tolist(), res, torch.cat(V[:m], dim=1) @ S.to(v.dtype)


def _tridiagonal(alphas: list, betas: list) -> Tensor:
    """The Lanczos matrix: ``alphas`` on the diagonal, ``betas[:m − 1]`` beside it (float64)."""
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def edge_tolerance(curv) -> float:
    """``τ``: eigenvalues within it of a count's edge count as at the edge (module doc)."""
    return 1e3 * pivot_tolerance(curv.num_parameters, curv.layout.dtype, _norm_estimate(curv)) + 1e-300


ZERO_ROUNDINGS = 8.0
"""The zero bulk is at least ``ZERO_ROUNDINGS·eps·‖H‖`` wide, ``eps`` that of the dtype
the curvature's oracles were computed in (``Curvature.source_dtype``): a float32
Hessian's null space, answered in float64, carries float32's rounding (up to ~2e-8·‖H‖
seen)."""


def zero_tolerance(curv) -> float:
    """The half-width of the zero bulk: ``max(τ, ZERO_ROUNDINGS·eps·‖H‖)`` (for a float64
    curvature ``τ``, :func:`edge_tolerance`). ``‖H‖`` here is the largest ``|θ|`` of 8
    Lanczos steps where that exceeds the estimate ``‖Hg‖/‖g‖`` (near a minimum the
    gradient lies in directions of low curvature, and the estimate can be far below
    ``‖H‖``); made once per curvature, and not for a float64 one."""
    if curv.source_dtype == torch.float64:
        return edge_tolerance(curv)
    if "zero_scale" not in curv.spectrum_cache:
        P = curv.num_parameters
        gen = torch.Generator().manual_seed(4)
        v = torch.randn((P, 1), generator=gen, dtype=curv.layout.dtype).to(curv.layout.device)
        theta, _, _ = _lanczos_extremes(curv, v, min(8, P))
        curv.spectrum_cache["zero_scale"] = max(abs(theta[0]), abs(theta[-1]), _norm_estimate(curv))
    eps = torch.finfo(curv.source_dtype).eps
    return max(edge_tolerance(curv), ZERO_ROUNDINGS * eps * curv.spectrum_cache["zero_scale"])


def _below(curv, sigma: float, tau: float | None = None) -> int:
    """The number of eigenvalues below ``σ`` (at ``σ − τ, σ − 2τ, …`` where ``H − σI`` is
    singular)."""
    return _below_at(curv, sigma, tau)[0]


def _below_at(curv, sigma: float, tau: float | None = None) -> tuple[int, float]:
    """:func:`_below` and the shift it counted at."""
    step = None
    for _ in range(EDGE_RETRIES):
        try:
            return curv.factorize(shift=sigma).inertia().negative, sigma
        except SingularSystemError:
            if step is None:
                step = tau if tau is not None else edge_tolerance(curv)
            sigma -= step
            step *= 2
    raise SingularSystemError(f"H − σI stayed singular near σ = {sigma:g}", damping=-sigma)


def eigenvalue_count(curv, lower, upper) -> int:
    """The exact number of eigenvalues of the curvature in ``[lower, upper)`` (two
    factorizations; an eigenvalue within ``edge_tolerance`` of an edge counts as at it)."""
    lower, upper = real_number(lower, "lower"), real_number(upper, "upper")
    if lower > upper:
        raise ValueError(f"lower must be <= upper, got lower={lower:g} > upper={upper:g}")
    if lower == upper:
        return 0
    return _below(curv, upper) - _below(curv, lower)


NEGATIVE_THRESHOLD = 1e-8
"""``negative_count`` counts eigenvalues below ``−max(zero_tolerance, NEGATIVE_THRESHOLD·‖H‖)``."""


def negative_count(curv, threshold: float | None = None) -> int:
    """The number of eigenvalues below ``−threshold`` (one factorization, at damping
    ``threshold``). The default, ``max(zero_tolerance, 1e-8·‖H‖)`` (``‖H‖`` estimated),
    leaves out the rounding noise around the zero bulk (module doc); at a damping that
    small the elimination's check can send the inertia to the pivoted KKT fallback,
    exact but dense per block (docs/chain.md)."""
    if threshold is None:
        threshold = max(zero_tolerance(curv), NEGATIVE_THRESHOLD * _norm_estimate(curv))
    else:
        threshold = real_number(threshold, "threshold")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold:g}")
    return _below(curv, -threshold)


def spectral_bounds(curv) -> tuple[float, float]:
    """``(a, b)`` with every eigenvalue in ``(a, b)``, certified by two inertias: a
    Lanczos estimate (8 HVPs), widened until the counts below ``a`` and ``b`` are ``0``
    and ``P``. Kept on the curvature."""
    if "bounds" in curv.spectrum_cache:
        return curv.spectrum_cache["bounds"]
    P = curv.num_parameters
    gen = torch.Generator().manual_seed(1)
    v = torch.randn((P, 1), generator=gen, dtype=curv.layout.dtype).to(curv.layout.device)
    theta, res, _ = _lanczos_extremes(curv, v, min(12, P))
    norm = max(abs(theta[0]), abs(theta[-1]), _norm_estimate(curv), 1e-300)
    pad_hi = max(res[-1], 1e-3 * norm)
    pad_lo = max(res[0], 1e-3 * norm)
    hi, lo = theta[-1] + pad_hi, theta[0] - pad_lo
    while _below(curv, hi) < P:
        pad_hi *= 4
        hi = theta[-1] + pad_hi
    while _below(curv, lo) > 0:
        pad_lo *= 4
        lo = theta[0] - pad_lo
    curv.spectrum_cache["bounds"] = (lo, hi)
    return lo, hi


# -- eigenvalues -----------------------------------------------------------------------------
def _factor_near(curv, sigma: float, tau: float):
    """``(factorization, σ')`` of ``H − σ'I`` for ``σ'`` at or next to ``σ`` (moved by
    ``τ, 2τ, …`` where singular, an eigenvalue there, or where the elimination breaks
    down: the shift is only the pole of a shift-invert search, whose answers the counts
    certify, so only the last try confirms a breakdown with the pivoted factorization;
    :func:`_below` confirms every one)."""
    step = tau
    for attempt in range(EDGE_RETRIES):
        try:
            return curv.factorize(shift=sigma, confirm_singular=attempt == EDGE_RETRIES - 1), sigma
        except SingularSystemError:
            sigma += step
            step *= 2
    raise SingularSystemError(f"H − σI stayed singular near σ = {sigma:g}", damping=-sigma)


def _shift_invert(
    curv, F, sigma: float, k: int, norm: float, exclude: Tensor | None, gen, block: int, accept_stalled: bool = False
):
    """The ``k`` eigenpairs nearest ``σ`` by block Lanczos on ``(H − σI)⁻¹`` (full
    reorthogonalization; Rayleigh–Ritz on the inverse to find them, then with ``H`` itself
    (:func:`_ritz_pairs`) for the digits the inverse's rounding ``‖(H − σI)⁻¹‖·eps``
    would cost). Returns eigenvalues, vectors (``P × k``), residual norms and the other
    Ritz values of the last Rayleigh–Ritz.

    The basis ``V`` and the next block ``Xᵀ`` are kept as rows (``n × P``, ``b × P``):
    projections and updates are wide products over contiguous rows (a tall ``P × n``
    product with ``b`` columns runs at half the speed here). Each block step passes over
    ``V`` two to four times: ``Vᵀ W`` (the new columns of ``T``, also the first
    Gram–Schmidt projection of the next block), the update, and where
    :data:`REORTHOGONALIZE_BELOW` asks for it a second projection and update. The
    inverse's residual of a Ritz pair ``(θ, V s)`` is the orthogonalized next block's part
    ``‖R s_last‖`` (``X − V Vᵀ X = Q R``): no vectors are formed until the pairs have
    converged. Columns of the next block below ``1e-10`` of the block's largest column
    before the projection are dropped (deflation); where none is left (the Krylov space is
    invariant, or spans everything) the Ritz pairs are read a last time, then those of
    ``H`` on the whole basis, and if neither passes the search goes on from a fresh block
    orthogonal to the basis (:func:`_fresh_block`). ``ConvergenceError`` where the basis
    spans everything, after :data:`FUTILE_FRESH_BLOCKS` fresh blocks in a row invariant at
    once, or after :data:`MAX_BLOCKS` block steps; with ``accept_stalled``, the best pairs
    met within :data:`STALLED_RESIDUAL_TOLERANCE` there instead, where there are any."""
    P = curv.num_parameters
    dtype, device = curv.layout.dtype, curv.layout.device
    # the start block, as rows (drawn in float32: a float64 draw costs 4–5× as much)
    XT = torch.randn((block, P), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    excluded = None if exclude is None or not exclude.shape[1] else exclude.mT.contiguous()
    cap = min(P, 16 * block)  # (pages are touched as the basis grows)
    V = XT.new_empty(cap, P)  # the basis, a vector a row
    T = torch.zeros((cap, cap), dtype=dtype, device=device)
    n, cross, ritz, fresh, futile, refilled = 0, None, None, 0, 0, False
    stalled: list = []  # (largest residual, pairs): the best met within STALLED_RESIDUAL_TOLERANCE
    for _ in range(MAX_BLOCKS + 1):
        size = XT.norm(dim=1)
        # X ⟂ (excluded, V); VᵀX of the first pass is known. A second pass where a column
        # kept less than REORTHOGONALIZE_BELOW of its norm in the first (twice is enough)
        for rep in range(2):
            if excluded is not None:
                XT = torch.addmm(XT, XT @ excluded.mT, excluded, alpha=-1.0)
            if n:
                proj = cross[:n].mT if rep == 0 and cross is not None else XT @ V[:n].mT
                XT = torch.addmm(XT, proj, V[:n], alpha=-1.0)
            if rep == 0 and bool((XT.norm(dim=1) >= REORTHOGONALIZE_BELOW * size).all()):
                break
        Q, R = torch.linalg.qr(XT.mT)  # (Q column-major: Qᵀ is rows)
        diagonal = R.diagonal().abs()
        keep = diagonal > 1e-10 * float(size.max()) if R.numel() else R.diagonal() > 0
        if not bool(keep.all()) or Q.shape[1] > P - n:
            Q = Q[:, keep][:, : P - n]
        b = Q.shape[1]
        if b and (n or excluded is not None) and float(diagonal[keep].min()) < 1e-4 * float(size.max()):
            # a column nearly deflated carries the projections' rounding along V
            # (~eps·‖X‖) amplified by ‖X‖/R_jj into Q: up to 1e-6 seen at R_jj ≈ 1e-10·‖X‖;
            # once more, where that could exceed 1e4·eps
            Q = torch.linalg.qr(_project_out(Q.mT, excluded, V[:n]).mT).Q
        if ritz is not None:  # the Ritz pairs of the basis so far, and their residuals
            theta, S, top, b_last = ritz
            r_inv = (R @ S[n - b_last : n, top]).norm(dim=0)
            est = (norm + abs(sigma)) * r_inv / theta[top].abs()
            converged = bool((est <= 1e-6 * norm).all())
            if converged or b_last < block or b < block:
                # the Ritz vectors of every θ within 4× of the k-th (inverse iteration
                # takes out the rest at ≤ 1/4 a step), k + 2 … k + 18 of them
                order = theta.abs().argsort(descending=True)
                near = int((theta.abs() >= 0.25 * theta[order[k - 1]].abs()).sum())
                # (a deflated block alone, the inverse unconverged: one Rayleigh–Ritz, no
                # inverse iteration, which is for the last digits)
                steps = INVERSE_ITERATIONS if converged or b == 0 else 0
                Z = _combine(V[:n].mT, S[:, order[: min(n, max(k + 2, min(near, k + 18)))]])
                found = _ritz_pairs(curv, F, Z, sigma, k, norm, excluded, steps, stalled)
                if found is not None:
                    return found
        if b == 0:
            # the basis is invariant (to the deflation's 1e-10): the Rayleigh–Ritz with H
            # on all of it has the pairs the inverse's Ritz vectors picked out inaccurately
            # (a cluster, or a shift next to an eigenvalue). First without inverse
            # iteration, which next to an excluded eigenvalue grows along it and leaves
            # only rounding once that is projected out. Inverse iteration on the whole
            # basis (n columns a step) only the first time
            for steps in ((0, INVERSE_ITERATIONS) if not fresh else (0,)) if n >= k else ():
                found = _ritz_pairs(curv, F, V[:n].mT, sigma, k, norm, excluded, steps, stalled)
                if found is not None:
                    return found
            # a fresh block invariant at once: the inverse is a multiple of the identity on
            # the rest of the space to the deflation's 1e-10 (a cluster that the wanted
            # pairs sit in); FUTILE_FRESH_BLOCKS of these in a row end the search
            futile = futile + 1 if refilled else 0
            if futile < FUTILE_FRESH_BLOCKS:
                fresh += 1
                Q = _fresh_block(V[:n], excluded, block, gen)
            b = Q.shape[1]
            if b == 0:
                if accept_stalled and stalled:
                    return stalled[0][1]
                raise ConvergenceError(
                    f"eigvalsh: the shift-invert Krylov space stopped growing at {n} vectors before the {k} pairs converged"
                )
            refilled = True
        else:
            refilled = False
        if n + b > cap:  # grow the buffers (doubling)
            cap = min(P, max(2 * cap, n + b))
            V2, T2 = XT.new_empty(cap, P), torch.zeros((cap, cap), dtype=dtype, device=device)
            V2[:n], T2[:n, :n] = V[:n], T[:n, :n]
            V, T = V2, T2
        W = F.solve(Q, refine=0)  # (unchecked: the Rayleigh–Ritz with H checks the pairs)
        V[n : n + b] = Q.mT
        cross = V[: n + b] @ W  # the new columns of Vᵀ(H − σI)⁻¹V
        T[: n + b, n : n + b] = cross
        T[n : n + b, : n + b] = cross.mT
        n += b
        Tn = T[:n, :n]
        theta, S = torch.linalg.eigh(0.5 * (Tn + Tn.mT))
        ritz = (theta, S, theta.abs().argsort(descending=True)[:k], b) if n >= k else None
        XT = W.mT
    if accept_stalled and stalled:
        return stalled[0][1]
    raise ConvergenceError(f"eigvalsh: shift-invert Lanczos did not converge in {MAX_BLOCKS} block steps")


FUTILE_FRESH_BLOCKS = 8
"""Fresh blocks in a row, each invariant at its first step, after which a shift-invert
search gives up (as after :data:`MAX_BLOCKS`): the pairs sit in a cluster that only
spanning all of it would resolve, which a small model's dense fallback does at once and
a large model cannot afford."""


def _project_out(XT: Tensor, excluded: Tensor | None, V: Tensor) -> Tensor:
    """The rows of ``XT`` less their parts along the rows of ``excluded``, then of ``V``
    (one classical Gram–Schmidt pass each)."""
    if excluded is not None:
        XT = torch.addmm(XT, XT @ excluded.mT, excluded, alpha=-1.0)
    return torch.addmm(XT, XT @ V.mT, V, alpha=-1.0) if V.shape[0] else XT


def _fresh_block(V: Tensor, excluded: Tensor | None, block: int, gen) -> Tensor:
    """Up to ``block`` orthonormal columns orthogonal to the rows of ``V`` and ``excluded``,
    drawn at random (in float32, as the start block): where the Krylov space became
    invariant before the pairs were found (a shift next to an eigenvalue whose
    amplification swamps the rest, or a null space the start block barely touched), a new
    start restricted to the rest of the space. Columns left below ``1e-8`` of their norm
    by the projections (the space is nearly all spanned) are dropped."""
    P = V.shape[1]
    XT = torch.randn((min(block, P - V.shape[0]), P), generator=gen, dtype=torch.float32).to(V)
    size = XT.norm(dim=1)
    XT = _project_out(_project_out(XT, excluded, V), excluded, V)  # twice is enough
    Q, R = torch.linalg.qr(XT.mT)
    keep = R.diagonal().abs() > 1e-8 * float(size.max()) if R.numel() else R.diagonal() > 0
    return Q[:, keep]


INVERSE_ITERATIONS = 12
"""Block inverse-iteration steps :func:`_ritz_pairs` may add to Ritz vectors of the inverse
(while :data:`STAGNATION_WINDOW` steps halve the best largest residual)."""
STAGNATION_WINDOW = 6
"""Inverse iteration stops where the best largest residual of this many steps is not half
the best before them (in a null-space cluster the residual jumps by 100× between steps on
its way down)."""


def _combine(Z: Tensor, S: Tensor) -> Tensor:
    """``Z S`` for a tall ``Z`` and a small ``S``, made as the wide product ``(Sᵀ Zᵀ)ᵀ``
    (2–3× faster than the tall one here, whatever ``Z``'s layout)."""
    return (S.mT @ Z.mT).mT


def _ritz_pairs(
    curv, F, Z: Tensor, sigma: float, k: int, norm: float, excluded: Tensor | None, steps: int = INVERSE_ITERATIONS,
    stalled: list | None = None,
):
    """The ``k`` Ritz pairs nearest ``σ`` of ``H`` on the span of ``Z`` (one block HVP):
    values, vectors, residual norms and the span's other Ritz values (estimates of the
    eigenvalues next beyond them); ``None`` unless each residual is
    ``≤ RESIDUAL_TOLERANCE·‖H‖``. Ritz vectors of the inverse carry the rest of the
    spectrum at the inverse's residual; within a cluster (a null space: ``(H − σI)⁻¹``
    has ``−1/σ`` many times) the Rayleigh–Ritz with ``H`` picks the most polluted
    mixture, whose Rayleigh quotient the pollution moved towards ``σ``. Up to ``steps`` steps ``Z ← (H − σI)⁻¹Z`` (a solve and an HVP each) take the
    pollution out by ``|λ − σ|/|μ − σ|`` a step, ``μ`` the eigenvalues beyond the span.
    ``Z`` is orthonormalized at every step, the first included: the Lanczos basis is
    orthogonal to ~1e-11 only, and the vectors found become the next search's exclusions.
    An inverse-iteration solve is unrefined until a step fails to halve the largest residual,
    then refined once: the residual's floor is the solve's backward error times ``‖H‖``.
    ``stalled`` (a list, ``[]`` or ``[(largest residual, pairs)]``) keeps the best pairs met
    with residuals ``≤ STALLED_RESIDUAL_TOLERANCE·‖H‖`` that were refused, for a search
    that would otherwise not converge."""
    tol = RESIDUAL_TOLERANCE * norm
    worst: list[float] = []
    refine = 0
    for step in range(steps + 1):
        if step:
            Z = F.solve(Z, refine=refine)
            if excluded is not None:
                Z = torch.addmm(Z, excluded.mT, excluded @ Z, alpha=-1.0)
        Z = torch.linalg.qr(Z).Q
        HZ = curv.hvp(Z)
        G = Z.mT @ HZ
        mu, S_H = torch.linalg.eigh(0.5 * (G + G.mT))
        pick = (mu - sigma).abs().argsort()[:k]
        Y, HY, lam = _combine(Z, S_H[:, pick]), _combine(HZ, S_H[:, pick]), mu[pick]
        res = (HY - Y * lam).norm(dim=0)
        others = torch.ones_like(mu, dtype=torch.bool)
        others[pick] = False
        if bool((res <= tol).all()):
            return lam, Y, res, mu[others]
        worst.append(float(res.max()))
        if stalled is not None and worst[-1] <= STALLED_RESIDUAL_TOLERANCE * norm and (not stalled or worst[-1] < stalled[0][0]):
            stalled[:] = [(worst[-1], (lam, Y, res, mu[others]))]
        if len(worst) > 1 and not worst[-1] <= 0.5 * min(worst[:-1]):
            # a step that did not halve the residual: from here on each solve is refined
            # once (the unrefined solve's backward error, up to ~1e-10 near a singular
            # shift, is a floor of the residuals it leaves)
            refine = 1
        # (not monotone: in a cluster the Rayleigh–Ritz picks differently polluted mixtures)
        if len(worst) > STAGNATION_WINDOW and not min(worst[-STAGNATION_WINDOW:]) <= 0.5 * min(worst[:-STAGNATION_WINDOW]):
            return None
    return None


FAR_TARGET = 10.0
"""``eigvalsh(k, "nearest", near=σ)`` with ``|σ|`` above this many times the estimate of
``‖H‖`` first checks ``σ`` against the certified bounds of the spectrum: beyond them it
answers as ``"largest"`` (``"smallest"``)."""

LANCZOS_STEPS = 400
"""Lanczos steps on ``H`` tried for the extreme eigenvalues before shift-invert takes over."""


def _extreme_lanczos(curv, k: int, which: str, norm: float, tau: float, vectors: bool = True, full: bool = False):
    """The ``k`` largest (smallest) eigenpairs by Lanczos on ``H`` (HVPs only), certified
    by one count: exactly ``k`` eigenvalues beyond the window's edge. ``None`` where that
    fails (a repeated eigenvalue Lanczos cannot see, or no convergence): shift-invert then.

    With ``vectors`` (or ``full``), full reorthogonalization; with ``vectors``, stopped
    where the residuals are ``≤ RESIDUAL_TOLERANCE·‖H‖`` (checked by one HVP of the Ritz
    vectors). Without, a semi-orthogonal basis (:class:`_SemiOrthogonality`), stopped
    where the eigenvalues are exact to ``VALUE_TOLERANCE·‖H‖`` by
    :func:`kato_temple_bounds` (residuals ~1e-7·‖H‖: about a third fewer steps). Where the
    Ritz vectors fail that certification with residuals well above their estimate from
    ``T`` (the basis's loss of orthogonality, ~1e-9·‖H‖, is a floor of theirs: a spectrum
    of two scales, whose wanted values need far smaller residuals), the search starts
    again with ``full``."""
    P = curv.num_parameters
    dtype, device = curv.layout.dtype, curv.layout.device
    steps = min(P, LANCZOS_STEPS)
    if k >= steps:
        return None
    tol = RESIDUAL_TOLERANCE * norm
    value_tol = VALUE_TOLERANCE * norm
    gen = torch.Generator().manual_seed(3)
    V = torch.empty((steps + 1, P), dtype=dtype, device=device)  # rows: contiguous vectors
    v = torch.randn((P,), generator=gen, dtype=dtype).to(device)
    V[0] = v / v.norm()
    alpha, beta = [], []
    check = k + 4
    # below this the next vector is rounding noise: the Krylov space is invariant
    breakdown = 64 * torch.finfo(dtype).eps * norm
    # without vectors, the basis is kept semi-orthogonal only (partial reorthogonalization)
    orthogonality = None if vectors or full else _SemiOrthogonality(P, dtype, norm)
    for j in range(steps):
        if j and beta[-1] == 0.0:
            return None  # invariant, unconverged: shift-invert takes over
        w = curv.hvp(V[j])
        a = float(V[j] @ w)
        Vj = V[: j + 1]
        # the three-term step, then one pass against the whole basis (a second where the
        # pass took more than REORTHOGONALIZE_BELOW of the norm: the loss it repairs grows
        # as β shrinks)
        w = w - a * V[j] if not j else w - a * V[j] - beta[-1] * V[j - 1]
        size = float(w.norm())
        b = size
        if orthogonality is None or orthogonality.step(alpha, beta, a, size):
            w = w - Vj.mT @ (Vj @ w)
            b = float(w.norm())
            if b < REORTHOGONALIZE_BELOW * size:
                w = w - Vj.mT @ (Vj @ w)
                b = float(w.norm())
        alpha.append(a)
        b = b if b > breakdown else 0.0
        beta.append(b)
        if b > 0:
            V[j + 1] = w / b
        m = j + 1
        if m < check and b > 0:
            continue
        check = m + max(2, m // 8)
        T = _tridiagonal(alpha, beta)
        theta, S = torch.linalg.eigh(T)
        pick = torch.arange(m - k, m) if which == "largest" else torch.arange(k)
        if m <= k:
            continue
        r_est = b * S[-1, pick].abs()
        if vectors:
            unconverged = bool((r_est > 0.5 * tol).any())
        else:  # the estimated Kato–Temple bounds, gaps to the neighbouring Ritz values
            inf = theta.new_full((1,), math.inf)
            steps = theta.diff()
            gaps = torch.minimum(torch.cat((inf, steps)), torch.cat((steps, inf)))[pick]
            unconverged = bool((r_est * r_est > 0.5 * value_tol * gaps).any())
        if unconverged:
            continue
        Y = Vj.mT @ S[:, pick].to(dtype)
        Y = Y / Y.norm(dim=0)
        HY = curv.hvp(Y)
        lam = (Y * HY).sum(dim=0)
        res = (HY - Y * lam).norm(dim=0)
        # residuals well above their estimate from T: the semi-orthogonal basis's loss is
        # their floor; where that is what keeps them from certifying, again with full
        stalled = orthogonality is not None and float(res.max()) > 10 * float(r_est.max()) + 1e-3 * tol
        if vectors and bool((res > tol).any()):
            if stalled:
                return _extreme_lanczos(curv, k, which, norm, tau, vectors, full=True)
            continue
        # the count: no other eigenvalue beyond (a point between) the k-th and the next Ritz
        # value; without vectors that far from the k-th that its Kato–Temple bound holds
        lam64 = lam.double().cpu()
        reach = 1e-6 * norm if vectors else max(1e-6 * norm, 2 * float(res.max()) ** 2 / value_tol)
        if which == "largest":
            edge_k = float(lam64.min())
            nxt = float(theta[m - k - 1]) if m > k else edge_k - norm
            below, edge = _below_at(curv, edge_k - max(min(0.5 * (edge_k - nxt), reach), 4 * tau), tau)
            count = P - below
        else:
            edge_k = float(lam64.max())
            nxt = float(theta[k]) if m > k else edge_k + norm
            count, edge = _below_at(curv, edge_k + max(min(0.5 * (nxt - edge_k), reach), 4 * tau), tau)
        if count != k:
            if vectors:
                return None
            # an unconverged (k+1)-th eigenvalue inside the wide window: go on as with
            # vectors (residuals to RESIDUAL_TOLERANCE, the edge at 1e-6·‖H‖)
            vectors = True
            continue
        if not vectors and not bool((kato_temple_bounds(lam64, res.double().cpu(), edge, which) <= value_tol).all()):
            if stalled:
                return _extreme_lanczos(curv, k, which, norm, tau, vectors, full=True)
            continue
        order = lam.argsort()
        return lam[order], Y[:, order]
    return None


class _SemiOrthogonality:
    """Partial reorthogonalization (Simon, 1984): estimates ``ω_k ≈ v_{j+1}ᵀv_k`` of the
    next Lanczos vector's loss of orthogonality by the recurrence the three-term step
    obeys in floating point, and asks for a pass against the whole basis only where one
    exceeds ``√eps`` (and at the step after, as the recurrence needs both vectors
    orthogonal). A semi-orthogonal basis (``|ω| ≤ √eps``) gives Ritz values as accurate
    as a fully orthogonal one."""

    def __init__(self, P: int, dtype: torch.dtype, norm: float):
        self.floor = 0.5 * math.sqrt(P) * torch.finfo(dtype).eps  # ω of a freshly orthogonalized vector
        self.norm = norm  # ‖H‖ (an estimate)
        self.limit = math.sqrt(torch.finfo(dtype).eps)
        self.previous: list[float] = []  # ω_{j-1, k}
        self.current: list[float] = [1.0]  # ω_{j, k}
        self.forced = False

    def step(self, alpha: list, beta: list, a: float, b: float) -> bool:
        """Whether the next vector (``w``, norm ``b`` after the three-term step with
        ``α_j = a``) needs the full pass; ``alpha``, ``beta`` the earlier steps'."""
        j = len(alpha)
        if b <= 0.0:
            return True
        omega = self.current
        nxt = []
        last = math.hypot(a, beta[j - 1]) if j else abs(a)
        for k in range(j):
            t = (alpha[k] - a) * omega[k] + beta[k] * omega[k + 1]
            if k:
                t += beta[k - 1] * omega[k - 1]
            t -= beta[j - 1] * self.previous[k]  # (j ≥ 1 here)
            # the rounding of the step (as PROPACK models it)
            t += math.copysign(self.floor * (math.hypot(alpha[k], beta[k]) + last), t)
            nxt.append(t / b)
        local = self.floor * self.norm / b  # ω_{j+1,j}: the three-term step's own rounding
        reorthogonalize = self.forced or max((abs(x) for x in nxt + [local]), default=0.0) > self.limit
        if reorthogonalize:
            nxt, local = [self.floor] * j, self.floor
            self.forced = not self.forced
        self.previous, self.current = omega, nxt + [local, 1.0]
        return reorthogonalize


def kato_temple_bounds(lam: Tensor, res: Tensor, edge: float, which: str) -> Tensor:
    """Error bounds of the Rayleigh quotients ``lam`` (residuals ``res``) of the ``k``
    eigenvalues beyond ``edge``, where a count showed exactly ``k`` there.

    Each ``[λᵢ − rᵢ, λᵢ + rᵢ]`` holds an eigenvalue; where these ``k`` intervals are
    disjoint and beyond the edge, each holds exactly one, and the nearest other
    eigenvalues are no nearer than the neighbouring intervals (or the edge): with
    ``a < λᵢ < b`` those limits, the eigenvalue is within ``rᵢ²/min(λᵢ − a, b − λᵢ)``
    of ``λᵢ`` (Kato–Temple). ``inf`` where the intervals do not separate."""
    order = lam.argsort()
    lo, hi = lam[order] - res[order], lam[order] + res[order]
    inf = torch.full((1,), math.inf, dtype=lam.dtype)
    below = torch.cat((inf.neg(), hi[:-1]))  # the next interval's upper end below each
    above = torch.cat((lo[1:], inf))
    if which == "largest":
        below[0] = edge
        inside = bool((lo > edge).all())
    else:
        above[-1] = edge
        inside = bool((hi < edge).all())
    separated = bool((hi[:-1] < lo[1:]).all())
    gap = torch.minimum(lam[order] - below, above - lam[order])
    bound = torch.where(gap > 0, res[order] ** 2 / gap, inf)
    if not (inside and separated):
        bound = inf.expand_as(bound)
    out = torch.empty_like(bound)
    out[order] = bound
    return out


def eigvalsh(curv, k: int, which: str = "largest", *, near=None, eigenvectors: bool = False):
    """``k`` eigenvalues of the curvature (ascending), and with ``eigenvectors=True`` the
    ``P × k`` orthonormal vectors, to full precision.

    ``which``: ``"largest"``, ``"smallest"`` or ``"nearest"`` (to ``near``). The target
    shift is ``near``, or a bound just beyond the spectrum certified by counts
    (:func:`spectral_bounds`); the ``k`` eigenpairs nearest it come from block
    shift-invert Lanczos with one factorization of ``H − σI``, refined to residuals
    ``≤ RESIDUAL_TOLERANCE·‖H‖``; a count over the window they span then proves that no
    eigenvalue was missed (else the search goes on, orthogonal to those found: repeated
    eigenvalues; or a count below the cluster at the k-th distance proves the rest are
    its members, :func:`_tie_certified`). A target on an eigenvalue is factored next to
    it, and once more from ``√(τ‖H‖)`` away where that does not converge; a target
    beyond the spectrum answers as largest/smallest (:data:`FAR_TARGET`). Where that
    does not converge, models of at most
    ``DENSE_FALLBACK_MAX_P`` parameters take a dense ``eigh``; larger ones accept the
    best pairs a stalled search met within ``STALLED_RESIDUAL_TOLERANCE·‖H‖`` (count
    certified as the others), else :class:`~tallskinny.errors.ConvergenceError` (a
    ``RuntimeError``).
    The extreme values come first from Lanczos on ``H``
    (:func:`_extreme_lanczos`); without eigenvectors they are accepted at a
    count-certified Kato–Temple bound ``≤ VALUE_TOLERANCE·‖H‖``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    P = curv.num_parameters
    if not 1 <= k <= P:
        raise ValueError(f"k must be in [1, P = {P}], got {k}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if which == "nearest":
        if near is None:
            raise ValueError("which='nearest' needs near=σ")
        near = real_number(near, "near")
    elif near is not None:
        raise ValueError(f"near is only for which='nearest' (which={which!r})")
    norm = _norm_estimate(curv)
    tau = edge_tolerance(curv)
    if which == "nearest" and abs(near) > FAR_TARGET * norm:
        # a target far beyond the spectrum (certified bounds): its nearest are the largest
        # (smallest), and ``|λ − σ|`` would round to one value for all of them
        lo, hi = spectral_bounds(curv)
        if not lo < near < hi:
            which, near = ("largest" if near >= hi else "smallest"), None
    if which == "nearest":
        sigma = near
    else:
        found = _extreme_lanczos(curv, k, which, norm, tau, vectors=eigenvectors)
        if found is not None:
            values, vectors = found
            return (values, vectors) if eigenvectors else values
        lo, hi = spectral_bounds(curv)
        sigma = hi if which == "largest" else lo
    target = sigma
    # a model too large for the dense fallback accepts, as a last resort, pairs within
    # STALLED_RESIDUAL_TOLERANCE where a search stalls (nearest: at the second pole only)
    last_resort = P > DENSE_FALLBACK_MAX_P
    F, sigma = _factor_near(curv, target, tau)
    try:
        found_l, found_v = _certified_nearest(curv, F, sigma, target, which, k, norm, tau, last_resort and which != "nearest")
    except ConvergenceError:
        found_l = None
        if which == "nearest":
            # a target on an eigenvalue (H − σI singular, and moved off it by a few τ, or
            # nearly): the inverse grows ~1/τ or more along that eigenvector, the Krylov
            # blocks become that vector and rounding, and the space stops growing. Once
            # more from √(τ‖H‖) away (a growth of ~1e5 instead of ~1e10)
            F, sigma = _factor_near(curv, target + math.sqrt(tau * norm), tau)
            try:
                found_l, found_v = _certified_nearest(curv, F, sigma, target, which, k, norm, tau, last_resort)
            except ConvergenceError:
                pass
        if found_l is None:
            if P > DENSE_FALLBACK_MAX_P:
                raise
            return _dense_eigenpairs(curv, k, target, which, eigenvectors)
    lam = torch.tensor(found_l, dtype=torch.float64)
    order = (lam - target).abs().argsort()[:k]
    order = order[lam[order].argsort()]
    values = lam[order].to(curv.layout.dtype)
    if not eigenvectors:
        return values
    vectors = found_v[:, order]
    return values, vectors


def _certified_nearest(
    curv, F, sigma: float, target: float, which: str, k: int, norm: float, tau: float, accept_stalled: bool = False
):
    """The eigenvalues found (a list, at least the ``k`` nearest ``target``) and their
    vectors, by shift-invert Lanczos with the factorization ``F`` of ``H − σI`` (``σ`` at
    or next to the target), looked for again orthogonal to those found until a count over
    the window of the ``k`` nearest the target holds no more than were found in it
    (:func:`_tie_certified` for a cluster at the k-th distance). ``ConvergenceError``
    where a search does not converge (``accept_stalled``: see :func:`_shift_invert`)."""
    P = curv.num_parameters
    gen = torch.Generator().manual_seed(2)
    block = min(P, max(k + 2, 4))
    found_l, found_v, beyond = [], None, []
    want = k
    while True:
        need = want - (0 if found_v is None else found_v.shape[1])
        lam, Y, _, others = _shift_invert(
            curv, F, sigma, need, norm, found_v, gen, min(P, max(need + 2, block)), accept_stalled
        )
        found_l.extend(lam.tolist())
        beyond.extend(others.tolist())
        found_v = Y if found_v is None else torch.cat((found_v, Y), dim=1)
        dist = sorted(abs(x - target) for x in found_l)
        radius = dist[k - 1]
        # the window of the k nearest, widened by a fraction of the distance: all found in it
        # must be all there are. Its edges go halfway to the nearest Ritz value beyond it
        # (the next eigenvalue's estimate): a count next to an eigenvalue is nearly singular,
        # and its inertia check would take the pivoted factorization
        pad = max(4 * tau, 1e-8 * max(radius, norm * 1e-8))
        reach = radius + pad
        nearest_beyond = min((d for d in (abs(x - target) for x in found_l + beyond) if d > reach), default=None)
        if nearest_beyond is not None:
            reach = max(reach, 0.5 * (radius + nearest_beyond))
        lower, upper, count = _window_count(curv, target, which, reach, reach, tau)
        inside = sum(lower <= x < upper for x in found_l)
        if count < inside:
            # fewer eigenvalues in the window than were found in it: a found value
            # counted beyond an edge it is within τ of; a missed one could hide behind it
            raise ConvergenceError(f"eigvalsh: a count of {count} eigenvalues in [{lower:.6g}, {upper:.6g}) where {inside} were found")
        if count == inside or found_v.shape[1] >= P:
            return found_l, found_v
        if _tie_certified(curv, target, which, found_l, radius, reach, norm, tau):
            return found_l, found_v  # the rest of the window is more of the k-th value's cluster
        want = found_v.shape[1] + (count - inside)  # missed (repeated) eigenvalues: look again


def _tie_certified(curv, target: float, which: str, found: list, radius: float, reach: float, norm: float, tau: float) -> bool:
    """Whether a window holding more eigenvalues than were found (``count ≥ k``) holds
    them at the k-th distance ``radius`` from the target: a cluster there (a null space,
    a repeated eigenvalue) of which any members are as near as those found. The cluster
    is the found values within ``tie = 4·RESIDUAL_TOLERANCE·‖H‖`` of that distance (each is
    exact to its residual), on the side of its nearest member. True where a count holds
    exactly the found values in it, over the distances below the cluster's (its nearest
    member's, less ``tie``) on that side and the whole first window (``reach``) on the
    other: nothing nearer was missed, and on the other side nothing at all (a near-tie
    across the target is not a cluster). None to count where the cluster is at the
    target. A count where the cluster members fall inside (an edge closer to them than
    the counts resolve) is not True: the search goes on. The width stays at
    ``RESIDUAL_TOLERANCE`` for a stalled search's pairs too (exact to ``1e-10·‖H‖`` only): a
    wider one would let the count skip a missed eigenvalue up to twice the width nearer,
    where a stalled member left out of the cluster only makes the search go on or fail."""
    tie = 4 * RESIDUAL_TOLERANCE * norm
    nearest = min((x for x in found if abs(x - target) >= radius - tie), key=lambda x: abs(x - target))
    tie_from = abs(nearest - target)
    if tie_from <= tie:
        return True
    inner = tie_from - tie
    above = nearest > target
    lower, upper, count = _window_count(curv, target, which, reach if above else inner, inner if above else reach, tau)
    return count == sum(lower <= x < upper for x in found)


def _window_count(curv, target: float, which: str, down: float, up: float, tau: float) -> tuple[float, float, int]:
    """The window ``[target − down, target + up)`` and the number of eigenvalues in it. For
    largest (smallest) it ends at the target, a bound of the spectrum certified by
    :func:`spectral_bounds`: all ``P`` eigenvalues are below it (none), one count less."""
    if which == "largest":
        lower = target - down
        return lower, target, curv.num_parameters - _below(curv, lower, tau)
    if which == "smallest":
        upper = target + up
        return target, upper, _below(curv, upper, tau)
    lower, upper = target - down, target + up
    return lower, upper, _below(curv, upper, tau) - _below(curv, lower, tau)


DENSE_FALLBACK_MAX_P = 4096
"""Where shift-invert Lanczos does not converge (a cluster it cannot resolve), models with
at most this many parameters take a dense symmetric eigendecomposition instead; larger
ones the stalled pairs of :data:`STALLED_RESIDUAL_TOLERANCE` where there are any."""


def _dense_eigenpairs(curv, k: int, sigma: float, which: str, eigenvectors: bool):
    """The ``k`` eigenpairs nearest ``σ`` (beyond it for largest/smallest) from
    ``torch.linalg.eigh`` of the dense curvature (``to_dense`` refuses what does not fit)."""
    M = curv.to_dense()
    lam, U = torch.linalg.eigh(0.5 * (M + M.mT))
    if which == "largest":
        order = torch.arange(lam.shape[0] - k, lam.shape[0], device=lam.device)
    elif which == "smallest":
        order = torch.arange(k, device=lam.device)
    else:
        order = (lam - sigma).abs().argsort()[:k]
        order = order[lam[order].argsort()]
    values = lam[order]
    return (values, U[:, order]) if eigenvectors else values


# -- histogram -------------------------------------------------------------------------------
class Histogram(NamedTuple):
    """Exact counts: ``counts[i]`` eigenvalues in ``[edges[i], edges[i+1])``, not counting
    the ``zeros`` (eigenvalues in ``[−tolerance, tolerance)``, the null space's bulk, where
    that interval lies inside the edges); ``below``/``above``: outside the edges."""

    edges: Tensor
    counts: Tensor
    zeros: int
    below: int
    above: int
    tolerance: float


def spectral_histogram(curv, edges, *, zero: float | None = None, progress: Callable[[int, int], None] | None = None) -> Histogram:
    """Exact eigenvalue counts per bin of ``edges`` (increasing; one factorization per
    edge, two more for the zero bulk, none where ``±zero`` are edges).

    ``zero``: the half-width of the zero bulk, ``[−zero, zero)`` (default
    :func:`zero_tolerance`): its eigenvalues are reported as ``zeros`` and taken out of
    whichever bins hold them, where the bulk lies inside the edges. Counts at shifts that deep in the bulk have a large condition
    number and can take the pivoted fallback; edges from :func:`symlog_edges` with
    ``zero`` well above rounding (``1e-4·‖H‖``) avoid that. ``progress(done, total)`` is
    called after each edge's count."""
    edges = torch.as_tensor(edges, dtype=torch.float64).flatten() if not isinstance(edges, Tensor) else edges.detach().double().flatten().cpu()
    if edges.numel() < 2:
        raise ValueError(f"edges must have at least 2 values, got {edges.numel()}")
    if not bool(torch.isfinite(edges).all()):
        raise ValueError("edges must be finite")
    if not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("edges must be strictly increasing")
    P = curv.num_parameters
    tau = edge_tolerance(curv)
    if zero is not None:
        zero = real_number(zero, "zero")
        if not zero > 0:
            raise ValueError(f"zero must be > 0, got {zero:g}")
    else:
        zero = zero_tolerance(curv)
    counted = {}
    for e in edges.tolist():
        counted[e] = _below(curv, e, tau)
        if progress is not None:
            progress(len(counted), edges.numel())
    below = [counted[float(e)] for e in edges]
    counts = torch.tensor([b - a for a, b in zip(below, below[1:])], dtype=torch.int64)
    zeros = 0
    lo_e, hi_e = float(edges[0]), float(edges[-1])
    if lo_e <= -zero and zero <= hi_e:
        for x in (-zero, zero):
            if x not in counted:
                counted[x] = _below(curv, x, tau)
        zeros = counted[zero] - counted[-zero]
        # each bin gives up the bulk's eigenvalues it holds (the bulk may span several)
        for j, (a, b) in enumerate(zip(edges[:-1].tolist(), edges[1:].tolist())):
            lo, hi = max(a, -zero), min(b, zero)
            if lo < hi:
                counts[j] -= counted[hi] - counted[lo]
    return Histogram(edges, counts, zeros, below[0], P - below[-1], zero)


def symlog_edges(lower: float, upper: float, bins: int, zero: float) -> Tensor:
    """``bins + 1`` increasing edges from ``lower < −zero`` to ``upper > zero``: one bin
    ``[−zero, zero)`` for the zero bulk, the others log-spaced in ``|λ|`` on each side
    (shared out by the decades each side spans, at least one a side)."""
    lower, upper, zero = real_number(lower, "lower"), real_number(upper, "upper"), real_number(zero, "zero")
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 3:
        raise ValueError(f"bins must be an integer >= 3, got {bins!r}")
    if not (zero > 0 and lower < -zero and upper > zero):
        raise ValueError(f"need lower < -zero < 0 < zero < upper, got {lower:g}, {zero:g}, {upper:g}")
    left, right = math.log(-lower / zero), math.log(upper / zero)
    n_left = min(max(1, round((bins - 1) * left / (left + right))), bins - 2)
    n_right = bins - 1 - n_left
    neg = -torch.logspace(math.log10(-lower), math.log10(zero), n_left + 1, dtype=torch.float64)
    pos = torch.logspace(math.log10(zero), math.log10(upper), n_right + 1, dtype=torch.float64)
    neg[0], neg[-1], pos[0], pos[-1] = lower, -zero, zero, upper  # exact ends
    return torch.cat((neg, pos))


# -- stochastic Lanczos quadrature -----------------------------------------------------------
class SLQ(NamedTuple):
    """Stochastic Lanczos quadrature: Ritz values ``nodes`` and ``weights`` summing to
    ``P`` (each probe's squared first components, averaged and scaled)."""

    nodes: Tensor
    weights: Tensor

    def density(self, x, width: float) -> Tensor:
        """Eigenvalues per unit at ``x``, each node broadened by a Gaussian of ``width``."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)
        z = (x - self.nodes.reshape(1, -1)) / width
        return torch.exp(-0.5 * z * z) @ self.weights / (width * math.sqrt(2 * math.pi))

    def counts(self, edges, width: float) -> Tensor:
        """The estimated number of eigenvalues per bin ``[edges[i], edges[i+1])``: the
        broadened density integrated over each bin (compare with :func:`spectral_histogram`)."""
        e = torch.as_tensor(edges, dtype=torch.float64).reshape(-1, 1)
        cdf = 0.5 * (1 + torch.erf((e - self.nodes.reshape(1, -1)) / (width * math.sqrt(2)))) @ self.weights
        return cdf[1:] - cdf[:-1]


def slq(hvp: Callable[[Tensor], Tensor], size: int, *, probes: int = 1, steps: int = 100, seed: int = 0,
        dtype: torch.dtype = torch.float64) -> SLQ:
    """Stochastic Lanczos quadrature of the symmetric operator ``hvp`` (flat ``(size,)``
    vectors; e.g. ``curv.hvp``): ``probes`` Gaussian probes, ``steps`` Lanczos steps each
    with full reorthogonalization (PyHessian's density, whose defaults are 1 and 100)."""
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(probes):
        v = torch.randn(size, generator=gen, dtype=dtype)
        V = torch.empty((min(steps, size), size), dtype=dtype)
        V[0] = v / v.norm()
        alpha, beta = [], []
        for j in range(V.shape[0]):
            w = hvp(V[j]).to(dtype).cpu()
            alpha.append(float(w @ V[j]))
            Vj = V[: j + 1]
            w = w - Vj.mT @ (Vj @ w)
            w = w - Vj.mT @ (Vj @ w)
            b = float(w.norm())
            if j == V.shape[0] - 1 or b <= 1e-12 * max(1.0, abs(alpha[-1])):
                break
            beta.append(b)
            V[j + 1] = w / b
        T = _tridiagonal(alpha, beta)
        theta, S = torch.linalg.eigh(T)
        nodes.append(theta)
        weights.append(S[0] ** 2 * (size / probes))
    return SLQ(torch.cat(nodes), torch.cat(weights))


def plot_histogram(hist: Histogram, ax=None, *, density=None, slq: SLQ | None = None, width: float | None = None,
                   label: str = "exact counts"):
    """Draw a :class:`Histogram` (matplotlib, imported here: optional) as bars, the zero
    bulk as a grey bar where ``[−tolerance, tolerance)`` is a bin (the x axis then
    symmetric-log); ``density = (x, y)`` (eigenvalues per unit) is drawn as counts per bin
    width of the first bin, ``slq`` (with its broadening ``width``) as its estimated
    count per bin. Returns the axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise ImportError("plot_histogram needs matplotlib (pip install matplotlib)") from e
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    e = hist.edges.numpy()
    c = hist.counts.numpy()
    ax.bar(e[:-1], c, width=e[1:] - e[:-1], align="edge", alpha=0.7, label=label)
    tol = hist.tolerance
    zero_bin = bool(((hist.edges == -tol).any() & (hist.edges == tol).any()).item())
    if zero_bin and hist.zeros:
        ax.bar([-tol], [hist.zeros], width=[2 * tol], align="edge", color="0.6",
               label=f"|λ| < {tol:.1e}: {hist.zeros} (near-)zeros")
        ax.set_xscale("symlog", linthresh=tol)
    if density is not None:
        x, y = density
        bin_width = float(e[1] - e[0])
        ax.plot(x, [v * bin_width for v in y], color="C3", label="SLQ density (× bin width)")
    if slq is not None:
        if width is None:
            raise ValueError("slq needs its broadening width")
        est = slq.counts(hist.edges, width).numpy()
        ax.stairs(est, e, color="C3", linewidth=1.5, label="SLQ estimate per bin")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("eigenvalues per bin")
    if not zero_bin:
        ax.set_title(f"exact spectrum ({hist.zeros} eigenvalues in ±{tol:.1e} not shown)")
    ax.legend()
    return ax
