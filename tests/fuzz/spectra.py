"""The spectral queries of random chains (issue 17) against ``eigvalsh`` of their dense
curvature: ``Curvature.eigvalsh`` (largest, smallest, nearest, nearest a dense eigenvalue
exactly; with and without vectors) and ``Curvature.eigenvalue_count`` on the chains of
:func:`chains.make_case` (every block, both kinds, every route), float64 but one seed
in eight (:func:`spectrum_dtype`) in float32. The dense fallback of ``eigvalsh`` is off: a
search that does not converge raises ``ts.ConvergenceError`` as on a model too large for
it, recorded as ``Report.unconverged`` (a wrong answer or any other error is a failure).

The reference is ``torch.linalg.eigvalsh`` of ``Curvature.spectral_curvature().to_dense()``
(the curvature the queries answer for, a float32 one's float64 copy; its agreement with
``torch.func`` is :func:`chains.check_case`'s). Float32 results are that copy's rounded
to float32: the tolerances grow by ``4·eps₃₂·‖H‖`` (values, residuals) and ``8·eps₃₂``
(orthonormality); the copy itself must be the float32 curvature's dense matrix to
``COPY_ROUNDINGS·eps₃₂·‖H‖``.
Values are compared to ``1e-10·‖H‖`` (the nearest as distances to ``σ``: ties in a cluster
may be either), residuals ``‖Hy − λy‖`` to ``1e-10·‖H‖``, the vectors' orthonormality to
``1e-8``; a count must lie between the counts of the interval shrunk and grown by the
edge tolerance ``τ`` (an eigenvalue within ``τ`` of an edge may count as at it).
"""

from __future__ import annotations

import copy
import random

import torch

import tallskinny as ts
from chains import Case, Report, call_recording_warnings
from tallskinny import spectrum

COPY_ROUNDINGS = 16
"""A float32 case's float64 copy may differ from the float32 matrix by this many
``eps₃₂·‖H‖`` (the float32 ``to_dense``'s own rounding)."""
VALUE_TOLERANCE = 1e-10
RESIDUAL_TOLERANCE = 1e-10
ORTHONORMALITY_TOLERANCE = 1e-8


def spectrum_dtype(seed: int) -> torch.dtype:
    """The dtype of the spectral fuzzer's case ``seed``: float32 where ``seed % 8 == 7``."""
    return torch.float32 if seed % 8 == 7 else torch.float64


def _targets(rng: random.Random, ev: torch.Tensor, norm: float) -> list:
    """``(which, k, near, eigenvectors)`` of the queries of one case: the two ends and an
    interior ``σ`` (anywhere, at the null space's 0, or next to an eigenvalue)."""
    P = ev.shape[0]
    near = rng.choice(
        [rng.uniform(-1.0, 1.0) * norm, 0.0, float(ev[rng.randrange(P)]) + rng.uniform(-1.0, 1.0) * 1e-3 * norm]
    )
    return [
        (which, rng.randint(1, min(P, 6)), near if which == "nearest" else None, rng.random() < 0.5)
        for which in spectrum.WHICH
    ]


def _intervals(rng: random.Random, ev: torch.Tensor, norm: float) -> list[tuple[float, float]]:
    """Two random intervals over the spectrum and one with an edge next to an eigenvalue."""
    out = [tuple(sorted(rng.uniform(-1.1, 1.1) * norm for _ in range(2))) for _ in range(2)]
    edge = float(ev[rng.randrange(ev.shape[0])]) + rng.choice([-1.0, 1.0]) * 1e-6 * norm
    out.append((edge, edge + rng.uniform(0.0, 1.0) * norm) if rng.random() < 0.5 else (edge - rng.uniform(0.0, 1.0) * norm, edge))
    return out


def _on_an_eigenvalue(rng: random.Random, ev: torch.Tensor) -> tuple:
    """A nearest query whose target is one of the dense eigenvalues exactly (``H − σI``
    singular, or nearly: the shift factored moves off it). Drawn after the others, so
    that their draws stay as they were."""
    return "nearest", rng.randint(1, min(ev.shape[0], 4)), float(ev[rng.randrange(ev.shape[0])]), rng.random() < 0.5


def check_spectrum(case: Case) -> Report:
    """Every spectral query of ``case`` against its dense eigenvalues."""
    report = Report("spectrum: " + case.description)
    modules, X, y = case.modules, case.X, case.y
    if case.dtype != torch.float64:
        modules = [copy.deepcopy(m).to(case.dtype) for m in modules]
        X, y = X.to(case.dtype), y.to(case.dtype) if y.dtype.is_floating_point else y
    curv = ts.Chain(modules, case.loss).curvature(X, y, kind=case.kind, method=case.method)
    exact = curv.spectral_curvature()
    M = exact.to_dense()
    M = 0.5 * (M + M.mT)
    ev = torch.linalg.eigvalsh(M)
    P = report.P = ev.shape[0]
    norm = float(ev.abs().max()) if P else 0.0
    if norm == 0.0:
        return report
    rounding = 0.0 if curv.layout.dtype == torch.float64 else torch.finfo(curv.layout.dtype).eps
    if rounding:  # the float64 copy is the float32 curvature's matrix (to its rounding)
        if exact.layout.dtype != torch.float64:
            report.failures.append(f"spectral_curvature() is {exact.layout.dtype}")
        low = curv.to_dense().double()
        report.record("float64 copy", float((M - 0.5 * (low + low.mT)).abs().max()), COPY_ROUNDINGS * rounding * norm)
    value_tol = VALUE_TOLERANCE * norm + 4 * rounding * norm
    residual_tol = RESIDUAL_TOLERANCE * norm + 4 * rounding * norm
    orthonormality_tol = max(ORTHONORMALITY_TOLERANCE, 8 * rounding)
    rng = random.Random(case.seed)
    saved = spectrum.DENSE_FALLBACK_MAX_P
    spectrum.DENSE_FALLBACK_MAX_P = 0
    try:
        queries = _targets(rng, ev, norm)
        intervals = _intervals(rng, ev, norm)
        queries.append(_on_an_eigenvalue(rng, ev))
        for which, k, near, vectors in queries:
            warned: list = []
            try:
                out = call_recording_warnings(lambda: curv.eigvalsh(k, which, near=near, eigenvectors=vectors), warned)
            except ts.ConvergenceError as error:  # (no dense fallback here)
                report.unconverged.append(f"{which} k={k} near={near}: {error}")
                continue
            values, Y = out if vectors else (out, None)
            if values.dtype != curv.layout.dtype or (Y is not None and Y.dtype != curv.layout.dtype):
                report.failures.append(f"{which}: results in {values.dtype}, not the curvature's {curv.layout.dtype}")
            values, Y = values.double(), None if Y is None else Y.double()
            if which == "nearest":
                got = (values - near).abs().sort().values
                want = (ev - near).abs().sort().values[:k]
            else:
                got, want = values, (ev[-k:] if which == "largest" else ev[:k])
            report.record(f"{which} values", float((got - want).abs().max()), value_tol, warned=bool(warned))
            if Y is not None:
                residual = float((M @ Y - Y * values).norm(dim=0).max())
                report.record(f"{which} residual", residual, residual_tol, warned=bool(warned))
                gram = Y.mT @ Y - torch.eye(k, dtype=Y.dtype)
                report.record(f"{which} orthonormal", float(gram.abs().max()), orthonormality_tol, warned=bool(warned))
        tau = spectrum.edge_tolerance(exact)
        worst = 0.0
        for lower, upper in intervals:
            warned = []
            count = call_recording_warnings(lambda: curv.eigenvalue_count(lower, upper), warned)
            fewest = int(((ev >= lower + tau) & (ev < upper - tau)).sum())
            most = int(((ev >= lower - tau) & (ev < upper + tau)).sum())
            if not fewest <= count <= most:
                if warned:
                    report.warned.add("count")
                else:
                    report.failures.append(f"count [{lower:.6g}, {upper:.6g}) = {count}, dense {fewest}…{most}")
                worst = float("inf")
        report.scores["count"] = worst
    finally:
        spectrum.DENSE_FALLBACK_MAX_P = saved
    return report
