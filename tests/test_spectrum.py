"""Spectral queries by inertia (issue 17) against dense ``torch.linalg.eigvalsh`` of the
dense references, on every route, Hessian (indefinite) and Gauss–Newton."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import spectrum
from tallskinny.testing import dense_ggn, dense_hessian

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture(autouse=True)
def no_dense_fallback(monkeypatch):
    """Every model here is small enough for ``eigvalsh``'s dense fallback, which would hide
    a shift-invert that does not converge: it is off but where a test turns it on."""
    monkeypatch.setattr(spectrum, "DENSE_FALLBACK_MAX_P", 0)


def mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return layers


def problem(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    X, y = torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g)
    return ts.Chain(mlp([5, 6, 6, 3], seed=seed), nn.CrossEntropyLoss()), X, y


CASES = [("hessian", "riccati"), ("hessian", "dense"), ("ggn", "riccati"), ("ggn", "kernel"), ("ggn", "dense")]


def reference(chain, X, y, kind):
    M = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    return M, torch.linalg.eigvalsh(M)


@pytest.mark.parametrize("kind,method", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_shifted_inertia_and_counts(kind, method, batch):
    chain, X, y = problem(batch)
    M, ev = reference(chain, X, y, kind)
    curv = chain.curvature(X, y, kind=kind, method=method)
    top = float(ev.abs().max())
    for sigma in (-0.3 * top, -0.01 * top, 0.013 * top, 0.5 * top, 1.01 * top):
        inertia = curv.factorize(shift=sigma).inertia()
        assert inertia.negative == int((ev < sigma).sum()), sigma
        assert inertia.positive == int((ev > sigma).sum()), sigma
    lo, hi = -0.02 * top, 0.4 * top
    assert curv.eigenvalue_count(lo, hi) == int(((ev >= lo) & (ev < hi)).sum())
    tau = spectrum.edge_tolerance(curv)
    assert curv.negative_count(tau) == int((ev < -tau).sum())
    threshold = max(tau, spectrum.NEGATIVE_THRESHOLD * float(curv.hvp(curv.gradient()).norm() / curv.gradient().norm()))
    assert curv.negative_count() == int((ev < -threshold).sum())


def test_shifted_logdet_matches_dense():
    chain, X, y = problem()
    M, ev = reference(chain, X, y, "hessian")
    curv = chain.curvature(X, y, method="riccati")
    sigma = 0.2 * float(ev[-1])
    F = curv.factorize(shift=sigma)
    assert F.shift == sigma and F.damping == -sigma
    ref = (ev - sigma).abs().log().sum()
    assert abs(float(F.logdet()) - float(ref)) <= 1e-9 * abs(float(ref))
    assert float(F.sign()) == (-1.0 if int((ev < sigma).sum()) % 2 else 1.0)
    b = torch.randn(curv.num_parameters, 2, generator=torch.Generator().manual_seed(5))
    x = F.solve(b)
    assert torch.linalg.norm((M - sigma * torch.eye(M.shape[0])) @ x - b) <= 1e-9 * b.norm()


@pytest.mark.parametrize("kind,method", CASES)
@pytest.mark.parametrize("which", ["largest", "smallest", "nearest"])
def test_eigvalsh_matches_dense(kind, method, which):
    chain, X, y = problem()
    M, ev = reference(chain, X, y, kind)
    curv = chain.curvature(X, y, kind=kind, method=method)
    norm = float(ev.abs().max())
    k = 4
    near = 0.05 * norm if which == "nearest" else None
    values, vectors = curv.eigvalsh(k, which, near=near, eigenvectors=True)
    if which == "largest":
        ref = ev[-k:]
    elif which == "smallest":
        ref = ev[:k]
    else:
        ref = ev[(ev - near).abs().argsort()[:k]].sort().values
    assert values.shape == (k,) and vectors.shape == (M.shape[0], k)
    # 1e-10 relative (and 1e-10·‖H‖ for the exact zeros of a Gauss–Newton matrix)
    assert bool(((values - ref).abs() <= 1e-10 * torch.maximum(ref.abs(), torch.tensor(norm * 1e-3))).all()), (values, ref)
    assert float((M @ vectors - vectors * values).norm(dim=0).max()) <= 1e-10 * norm
    assert float((vectors.mT @ vectors - torch.eye(k)).abs().max()) <= 1e-8
    assert torch.equal(curv.eigvalsh(k, which, near=near), values) or bool(
        ((curv.eigvalsh(k, which, near=near) - values).abs() <= 1e-12 * norm).all()
    )


@pytest.mark.parametrize("kind,method", CASES)
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_extreme_values_alone_match_dense(kind, method, which):
    """Without eigenvectors the extreme values stop at their Kato–Temple bound
    (≤ 1e-13·‖H‖): against dense ``eigvalsh`` to 1e-12·‖H‖."""
    chain, X, y = problem(batch=2, seed=3)
    M, ev = reference(chain, X, y, kind)
    norm = float(ev.abs().max())
    values = chain.curvature(X, y, kind=kind, method=method).eigvalsh(5, which)
    ref = ev[-5:] if which == "largest" else ev[:5]
    assert float((values - ref).abs().max()) <= 1e-12 * norm


def test_repeated_eigenvalues_are_all_found():
    """The Gauss–Newton matrix's null space: an eigenvalue 0 of multiplicity P − r; the
    final count makes the search find every copy asked for."""
    chain, X, y = problem(batch=2)
    M, ev = reference(chain, X, y, "ggn")
    curv = chain.curvature(X, y, kind="ggn", method="riccati")
    norm = float(ev.abs().max())
    values, vectors = curv.eigvalsh(12, "nearest", near=1e-3 * norm, eigenvectors=True)
    assert float(values.abs().max()) <= 1e-10 * norm
    assert float((M @ vectors).norm(dim=0).max()) <= 1e-10 * norm
    assert float((vectors.mT @ vectors - torch.eye(12)).abs().max()) <= 1e-8


def test_histogram_counts_every_eigenvalue():
    chain, X, y = problem()
    M, ev = reference(chain, X, y, "hessian")
    curv = chain.curvature(X, y)
    norm = float(ev.abs().max())
    edges = torch.linspace(-0.5 * norm, 0.9 * norm, 11)
    hist = curv.spectral_histogram(edges)
    tau = hist.tolerance
    zero = (ev >= -tau) & (ev < tau)
    assert hist.zeros == int(zero.sum()) > 0
    ref = torch.histogram(ev[~zero], bins=edges.double()).hist.long()
    ref[-1] -= int((ev[~zero] == edges[-1]).sum())  # torch closes the last bin; ours is [a, b)
    assert torch.equal(hist.counts, ref)
    assert hist.below == int((ev < edges[0]).sum()) and hist.above == int((ev >= edges[-1]).sum())
    assert int(hist.counts.sum()) + hist.zeros + hist.below + hist.above == curv.num_parameters


def test_singular_shift_raises():
    chain, X, y = problem()
    curv = chain.curvature(X, y, method="riccati")
    with pytest.raises(ts.SingularSystemError):
        curv.factorize(shift=0.0)  # the parameter blocks' null space
    dense = chain.curvature(X, y, method="dense")
    _, ev = reference(chain, X, y, "hessian")
    with pytest.raises(ts.SingularSystemError):
        dense.factorize(shift=float(ev[-1]))
    ggn = chain.curvature(X, y, kind="ggn", method="kernel")
    with pytest.raises(ts.SingularSystemError):
        ggn.factorize(shift=0.0)


def test_bad_arguments_raise_before_work():
    chain, X, y = problem()
    curv = chain.curvature(X, y)
    with pytest.raises(ValueError, match="not both"):
        curv.factorize(0.1, shift=0.2)
    with pytest.raises(ValueError, match="finite"):
        curv.factorize(shift=math.nan)
    with pytest.raises(TypeError, match="shift"):
        curv.factorize(shift="1")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        curv.factorize(-0.1)  # a damping keeps its meaning: a shift is asked for by name
    with pytest.raises(ValueError, match="lower must be <= upper"):
        curv.eigenvalue_count(1.0, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        curv.eigvalsh(0)
    with pytest.raises(TypeError, match="k must be"):
        curv.eigvalsh(1.5)
    with pytest.raises(ValueError, match="which"):
        curv.eigvalsh(2, "middle")
    with pytest.raises(ValueError, match="near"):
        curv.eigvalsh(2, "nearest")
    with pytest.raises(ValueError, match="near"):
        curv.eigvalsh(2, "largest", near=1.0)
    with pytest.raises(ValueError, match="increasing"):
        curv.spectral_histogram([0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="at least 2"):
        curv.spectral_histogram([0.0])
    assert curv.spectrum_cache == {}  # no work was done


def test_parameters_untouched():
    chain, X, y = problem()
    before = [p.detach().clone() for p in chain.parameters()]
    Xc = X.clone()
    curv = chain.curvature(X, y)
    curv.eigvalsh(2, "largest")
    curv.spectral_histogram([-1.0, 0.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(before, chain.parameters()))
    assert torch.equal(X, Xc)


def test_stale_curvature_refused():
    chain, X, y = problem()
    curv = chain.curvature(X, y)
    with torch.no_grad():
        next(iter(chain.parameters())).add_(1.0)
    with pytest.raises(ts.StaleCurvatureError):
        curv.eigvalsh(1)
    with pytest.raises(ts.StaleCurvatureError):
        curv.eigenvalue_count(0.0, 1.0)


def test_deep_single_sample_chain():
    """A deep uniform chain at batch 1 (the batched runs of identical layers): shifted
    inertia and log-determinant against dense."""
    chain = ts.Chain(mlp([5] + [5] * 12 + [3]), nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(1, 5, generator=g), torch.tensor([1])
    M, ev = reference(chain, X, y, "hessian")
    curv = chain.curvature(X, y, method="riccati")
    top = float(ev.abs().max())
    for sigma in (-0.3 * top, -0.01 * top, 0.02 * top, 0.5 * top):
        F = curv.factorize(shift=sigma)
        assert F.inertia().negative == int((ev < sigma).sum())
        ref = float((ev - sigma).abs().log().sum())
        assert abs(float(F.logdet()) - ref) <= 1e-9 * abs(ref)
    near = 0.02 * top
    values = curv.eigvalsh(3, "nearest", near=near)
    ref = ev[(ev - near).abs().argsort()[:3]].sort().values
    assert bool(((values - ref).abs() <= 1e-10 * ref.abs()).all())


# -- symmetric-log bins, the zero bin, SLQ -------------------------------------------------------
def test_symlog_edges():
    edges = spectrum.symlog_edges(-2.0, 30.0, 50, 1e-4)
    assert edges.shape == (51,) and bool((edges[1:] > edges[:-1]).all())
    assert float(edges[0]) == -2.0 and float(edges[-1]) == 30.0
    i = int((edges == -1e-4).nonzero())
    assert float(edges[i + 1]) == 1e-4  # the zero bin [-1e-4, 1e-4) is one bin
    assert i < 50 - i  # more decades on the positive side, more bins there
    for bad in [(-1.0, 1.0, 2, 1e-3), (-1.0, 1.0, 10, 0.0), (1e-5, 1.0, 10, 1e-3), (-1.0, 1.0, 10.0, 1e-3)]:
        with pytest.raises(ValueError):
            spectrum.symlog_edges(*bad)


def test_histogram_with_a_zero_bin_sums_to_P(monkeypatch):
    """The zero bin's counts are the edges' own (no factorization at ±τ, deep in the bulk)."""
    chain, X, y = problem(batch=2)
    M, ev = reference(chain, X, y, "hessian")
    curv = chain.curvature(X, y, method="riccati")
    rho = float(ev.abs().max())
    delta = 1e-4 * rho
    edges = spectrum.symlog_edges(float(ev[0]) - 1e-3 * rho, float(ev[-1]) + 1e-3 * rho, 12, delta)
    shifts = []
    factorize = curv.factorize
    monkeypatch.setattr(curv, "factorize", lambda *a, **k: shifts.append(k["shift"]) or factorize(*a, **k))
    seen = []
    hist = curv.spectral_histogram(edges, zero=delta, progress=lambda d, t: seen.append((d, t)))
    assert sorted(shifts) == sorted(edges.tolist()) and seen[-1] == (13, 13)
    zero = (ev >= -delta) & (ev < delta)
    assert hist.zeros == int(zero.sum()) > 0 and hist.tolerance == delta
    ref = torch.histogram(ev[~zero], bins=edges).hist.long()
    assert torch.equal(hist.counts, ref)
    assert hist.below == hist.above == 0
    assert int(hist.counts.sum()) + hist.zeros == curv.num_parameters
    # a bulk over three bins: each gives up its part of it
    wide = curv.spectral_histogram(torch.linspace(-1.01 * rho, 1.01 * rho, 4), zero=0.5 * rho)
    inside = (ev >= -0.5 * rho) & (ev < 0.5 * rho)
    assert wide.zeros == int(inside.sum())
    assert torch.equal(wide.counts, torch.histogram(ev[~inside], bins=torch.linspace(-1.01 * rho, 1.01 * rho, 4)).hist.long())


def test_slq_against_dense():
    """The quadrature's moments are the probe's: Σ w θᵏ = P·vᵀHᵏv/vᵀv for k < 2·steps;
    with steps = P the nodes are the eigenvalues."""
    chain, X, y = problem()
    M, ev = reference(chain, X, y, "hessian")
    curv = chain.curvature(X, y)
    P = curv.num_parameters
    est = spectrum.slq(curv.hvp, P, probes=2, steps=6, seed=4)
    gen = torch.Generator().manual_seed(4)
    probes = [torch.randn(P, generator=gen) for _ in range(2)]
    assert abs(float(est.weights.sum()) - P) <= 1e-10 * P
    norm = float(ev.abs().max())
    for k in (1, 2, 5):
        ref = sum(P / 2 * float(v @ torch.linalg.matrix_power(M, k) @ v / (v @ v)) for v in probes)
        assert abs(float((est.weights * est.nodes**k).sum()) - ref) <= 1e-9 * P * norm**k, k
    full = spectrum.slq(curv.hvp, P, steps=P, seed=1)
    big = full.weights > 1e-8  # the nodes carrying weight are eigenvalues
    assert float((full.nodes[big, None] - ev[None]).abs().min(dim=1).values.max()) <= 1e-8 * norm
    edges = torch.tensor([-2 * norm, 0.0, 2 * norm])
    assert abs(float(est.counts(edges, 1e-3 * norm).sum()) - P) <= 1e-6 * P
    x = torch.linspace(-3 * norm, 3 * norm, 20001)
    assert abs(float(torch.trapezoid(est.density(x, 0.05 * norm), x)) - P) <= 1e-6 * P


@pytest.mark.parametrize(
    "widths,seed,batch,k,fraction",
    [
        ([4, 5, 5, 3], 0, 1, 1, 0.01),
        ([4, 5, 5, 3], 0, 1, 4, 0.01),
        ([5, 6, 6, 3], 0, 1, 4, 0.01),
        ([5, 6, 6, 3], 2, 1, 1, 0.05),
        ([5, 6, 6, 3], 1, 4, 12, 0.01),
        ([6, 8, 8, 2], 1, 1, 4, 0.05),
    ],
)
def test_nearest_next_to_the_null_space(widths, seed, batch, k, fraction):
    """Small Hessians (P = 73…146) with a null space of 51…120: the k nearest to σ are
    all or partly in that cluster, where (H − σI)⁻¹ has −1/σ many times. Used to raise
    (the Krylov space spans everything before the Ritz vectors converge; the basis
    outgrew P). Ties within the cluster: any of its vectors is right, so the
    distances to σ are compared, and every residual."""
    g = torch.Generator().manual_seed(seed + 1)
    X, y = torch.randn(batch, widths[0], generator=g), torch.randint(0, widths[-1], (batch,), generator=g)
    chain = ts.Chain(mlp(widths, seed=seed), nn.CrossEntropyLoss())
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    near = fraction * norm
    values, vectors = chain.curvature(X, y).eigvalsh(k, "nearest", near=near, eigenvectors=True)
    ref = (ev - near).abs().sort().values[:k]
    assert torch.allclose((values - near).abs().sort().values, ref, rtol=0, atol=1e-10 * norm)
    assert float((M @ vectors - vectors * values).norm(dim=0).max()) <= 1e-10 * norm
    assert float((vectors.mT @ vectors - torch.eye(k)).abs().max()) <= 1e-8


def test_kato_temple_bounds_hold_and_refuse_what_they_cannot_separate():
    """Rayleigh quotients of perturbed eigenvectors of a known diagonal matrix: each is
    within its bound of its eigenvalue; intervals that overlap, or cross the edge, give
    no bound (inf)."""
    gen = torch.Generator().manual_seed(7)
    ev = torch.tensor([-3.0, -1.0, 0.5, 2.0, 2.3, 4.0])
    A = torch.diag(ev)
    top = torch.tensor([3, 4, 5])
    Y = torch.eye(6)[:, top] + 1e-3 * torch.randn(6, 3, generator=gen)
    Y = Y / Y.norm(dim=0)
    lam = (Y * (A @ Y)).sum(dim=0)
    res = (A @ Y - Y * lam).norm(dim=0)
    bound = spectrum.kato_temple_bounds(lam, res, 1.0, "largest")
    assert bool(torch.isfinite(bound).all())
    assert bool(((lam - ev[top]).abs() <= bound).all())
    assert bool((bound < res).all())  # quadratic in the residual
    assert bool(torch.isinf(spectrum.kato_temple_bounds(lam, res, 2.1, "largest")).all())  # edge inside
    wide = torch.full((3,), 0.2)
    assert bool(torch.isinf(spectrum.kato_temple_bounds(lam, wide, 1.0, "largest")).all())  # 2.0, 2.3 overlap
    low = torch.tensor([0, 1])
    Z = torch.eye(6)[:, low] + 1e-3 * torch.randn(6, 2, generator=gen)
    Z = Z / Z.norm(dim=0)
    mu = (Z * (A @ Z)).sum(dim=0)
    bound = spectrum.kato_temple_bounds(mu, (A @ Z - Z * mu).norm(dim=0), 0.0, "smallest")
    assert bool(((mu - ev[low]).abs() <= bound).all())


def test_shift_invert_without_convergence_takes_the_dense_path_on_small_models(monkeypatch):
    """No block step allowed: the search cannot converge; a small model gets the dense
    eigendecomposition (equal to the reference), a large one the RuntimeError."""
    chain, X, y = problem()
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    monkeypatch.setattr(spectrum, "MAX_BLOCKS", 0)
    monkeypatch.setattr(spectrum, "DENSE_FALLBACK_MAX_P", 4096)
    curv = chain.curvature(X, y)
    near = 0.05 * norm
    values, vectors = curv.eigvalsh(3, "nearest", near=near, eigenvectors=True)
    ref = ev[(ev - near).abs().argsort()[:3]].sort().values
    assert bool(((values - ref).abs() <= 1e-10 * norm).all())
    assert float((M @ vectors - vectors * values).norm(dim=0).max()) <= 1e-10 * norm
    monkeypatch.setattr(spectrum, "DENSE_FALLBACK_MAX_P", 10)
    with pytest.raises(ts.ConvergenceError, match="shift-invert"):
        chain.curvature(X, y).eigvalsh(3, "nearest", near=near)


@pytest.mark.parametrize("which", ["nearest", "largest"])
def test_a_stalled_search_is_the_last_resort_of_large_models(which, monkeypatch):
    """``RESIDUAL_TOLERANCE`` out of reach (1e-17): no Ritz pair passes, and every search
    runs until its Krylov space stops growing. A model above ``DENSE_FALLBACK_MAX_P``
    (here every model: the fixture sets it to 0) gets the best pairs its search met within
    ``STALLED_RESIDUAL_TOLERANCE·‖H‖`` (a pole that cannot separate a pair from its
    neighbours: fuzz seeds 85, 392, 2778), equal to the dense ones and count-certified; a
    model small enough for the dense fallback gets that, exact, instead (a review found
    the stalled pairs first cost it digits: 1.3 % of a 2e-10·‖H‖ eigenvalue, seed 85);
    with the stalled tolerance out of reach too, ``ConvergenceError``."""
    chain, X, y = problem()
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    near = 0.05 * norm if which == "nearest" else None
    ref = ev[(ev - near).abs().argsort()[:3]].sort().values if which == "nearest" else ev[-3:]
    monkeypatch.setattr(spectrum, "RESIDUAL_TOLERANCE", 1e-17)
    values, vectors = chain.curvature(X, y).eigvalsh(3, which, near=near, eigenvectors=True)
    assert bool(((values - ref).abs() <= 1e-10 * norm).all())
    assert float((M @ vectors - vectors * values).norm(dim=0).max()) <= spectrum.STALLED_RESIDUAL_TOLERANCE * norm
    dense = []
    dense_eigenpairs = spectrum._dense_eigenpairs
    monkeypatch.setattr(spectrum, "_dense_eigenpairs", lambda *a: dense.append(1) or dense_eigenpairs(*a))
    monkeypatch.setattr(spectrum, "DENSE_FALLBACK_MAX_P", 4096)
    values, _ = chain.curvature(X, y).eigvalsh(3, which, near=near, eigenvectors=True)
    assert dense and bool(((values - ref).abs() <= 1e-13 * norm).all())
    monkeypatch.setattr(spectrum, "DENSE_FALLBACK_MAX_P", 0)
    monkeypatch.setattr(spectrum, "STALLED_RESIDUAL_TOLERANCE", 1e-17)
    with pytest.raises(ts.ConvergenceError, match="shift-invert"):
        chain.curvature(X, y).eigvalsh(3, which, near=near, eigenvectors=True)


class _DenseCurvature:
    """A dense symmetric matrix posing as a curvature: exact counts (``eigvalsh`` of
    ``H − σI``), exact solves."""

    class _Factorization:
        def __init__(self, H, shift):
            self.A = H - shift * torch.eye(H.shape[0], dtype=H.dtype)
            ev = torch.linalg.eigvalsh(self.A)
            if bool((ev.abs() <= 1e-14).any()):
                raise ts.SingularSystemError("singular", damping=-shift)
            self.negative = int((ev < 0).sum())

        def solve(self, Q, refine=0):
            return torch.linalg.solve(self.A, Q)

        def inertia(self):
            return self

    def __init__(self, H):
        self.H, self.num_parameters = H, H.shape[0]
        self.layout = type("Layout", (), {"dtype": H.dtype, "device": H.device})()
        self.spectrum_cache, self.source_dtype = {}, H.dtype
        ev, U = torch.linalg.eigh(H)
        self._g = U[:, ev.abs().argmax()].clone()

    def gradient(self):
        return self._g

    def hvp(self, v):
        return self.H @ v

    def factorize(self, shift=0.0, confirm_singular=False):
        return self._Factorization(self.H, shift)


@pytest.mark.parametrize("which,near,k", [("largest", None, 3), ("nearest", 0.72, 2)])
def test_stalled_pairs_never_certify_a_missed_eigenvalue(which, near, k, monkeypatch):
    """A stalled search returns pairs from a basis that never met the eigenvector of
    0.5 + 3e-10 (the 0.5 pair polluted by the 0.45 one: residual 9.5e-11·‖H‖, refused at
    ``RESIDUAL_TOLERANCE``, kept as the stalled best). The counts must not certify them:
    the cluster test's width stays ``4·RESIDUAL_TOLERANCE·‖H‖`` (widened by the pairs'
    residuals, a version found by review returned 0.5 for 0.5 + 3e-10). The answer is
    right to 1e-10 or ``ConvergenceError``."""
    ev = [1.0, 0.7, 0.5 + 3e-10, 0.5, 0.45, 0.1] + torch.linspace(-0.9, -0.6, 194).tolist()
    U = torch.linalg.qr(torch.randn(200, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    H = (U * torch.tensor(ev, dtype=torch.float64)) @ U.mT
    H = 0.5 * (H + H.mT)
    shift_invert = spectrum._shift_invert

    def stalled_search(curv, F, sigma, need, norm, exclude, gen, block, accept_stalled=False):
        if not accept_stalled:
            raise ts.ConvergenceError("stalled")
        if exclude is not None:
            return shift_invert(curv, F, sigma, need, norm, exclude, gen, block, accept_stalled)
        tops = [U[:, 0], U[:, 1]] if which == "largest" else [U[:, 1]]
        Z = torch.stack(tops + [U[:, 3] + 1.9e-9 * U[:, 4]], 1)
        stalled = []
        assert spectrum._ritz_pairs(curv, F, Z, sigma, need, norm, None, 0, stalled) is None
        return stalled[0][1]

    monkeypatch.setattr(spectrum, "_shift_invert", stalled_search)
    monkeypatch.setattr(spectrum, "_extreme_lanczos", lambda *a, **kw: None)
    ref = torch.linalg.eigvalsh(H)
    want = ref[-k:] if which == "largest" else ref[(ref - near).abs().argsort()[:k]].sort().values
    try:
        values = spectrum.eigvalsh(_DenseCurvature(H), k, which, near=near)
    except ts.ConvergenceError:
        return
    assert float((values - want).abs().max()) <= 1e-10


def test_gauss_newton_largest_beyond_its_rank_vectors_orthonormal():
    """k above the Gauss–Newton matrix's rank: the search reaches its null space, finds
    vectors there, and looks again with them excluded. The Ritz vectors of the Lanczos basis
    (orthogonal to ~1e-11 only) are orthonormalized before they are returned and excluded:
    without that, a junk column along an excluded vector survived and the search ended
    unconverged (widths [8, 4, 4, 4, 2]), and the returned vectors were orthogonal to 2e-11."""
    for widths, seed, data_seed, k in (([8, 4, 4, 4, 2], 5, 6, 5), ([4, 5, 5, 3], 1, 2, 12)):
        g = torch.Generator().manual_seed(data_seed)
        X, y = torch.randn(4, widths[0], generator=g), torch.randint(0, widths[-1], (4,), generator=g)
        chain = ts.Chain(mlp(widths, seed=seed), nn.CrossEntropyLoss())
        M, ev = reference(chain, X, y, "ggn")
        values, vectors = chain.curvature(X, y, kind="ggn").eigvalsh(k, "largest", eigenvectors=True)
        norm = float(ev.abs().max())
        assert (values - ev[-k:]).abs().max() <= 1e-10 * norm
        assert (M @ vectors - vectors * values).norm(dim=0).max() <= 1e-10 * norm
        assert (vectors.mT @ vectors - torch.eye(k, dtype=vectors.dtype)).abs().max() <= 1e-13


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_float32_krylov_space_exhausted_by_a_rank_one_matrix(which, monkeypatch):
    """A float32 Gauss–Newton matrix of rank 1 (P = 17): the extreme Lanczos's second
    vector is rounding noise (‖w‖ ~ eps·‖H‖, not 0). Dividing by it made NaN vectors
    (a ValueError from the next product, before any fallback); a norm below 64·eps·‖H‖ is
    a breakdown now, and the search goes on past Lanczos (to shift-invert, or the dense
    fallback). Values to float32's accuracy."""
    monkeypatch.setattr(spectrum, "DENSE_FALLBACK_MAX_P", 4096)
    torch.manual_seed(2)
    layers = [nn.Linear(2, 3, dtype=torch.float32), nn.Tanh(), nn.Linear(3, 2, dtype=torch.float32)]
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(1, 2, generator=g, dtype=torch.float32), torch.randint(0, 2, (1,), generator=g)
    chain = ts.Chain([m.float() for m in layers], nn.CrossEntropyLoss())
    M = dense_ggn(ts.Chain([m.double() for m in copy.deepcopy(layers)], nn.CrossEntropyLoss()), X.double(), y)
    ev = torch.linalg.eigvalsh(M)
    values = chain.curvature(X, y, kind="ggn").eigvalsh(4, which)
    assert values.dtype == torch.float32
    exact = ev[-4:] if which == "largest" else ev[:4]
    assert (values.double() - exact).abs().max() <= 1e-5 * float(ev.abs().max())


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_float32_queries_run_on_a_float64_copy(kind):
    """A float32 curvature (P = 1 476): the queries run on its float64 copy
    (``spectral_curvature``) and come back in float32, each converged by itself (the dense
    fallback is off). In float32 the counts' edge tolerance is 0.14·‖H‖ and float32 HVPs
    never reach the residual tolerance: every shift-invert search ended in a
    ConvergenceError (or, where allowed, the dense fallback after 60 block steps), and
    with a float32 residual tolerance the coarse counts certified a duplicated eigenvalue
    in place of a missed one. Values and residuals to 1e-10·‖H‖ of the copy's dense
    matrix, to 1e-5·‖H‖ of the float32 one's; counts those of the copy."""
    torch.manual_seed(0)
    layers = [m.float() for m in mlp([8, 32, 32, 4], seed=0)]
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(8, 8, generator=g).float(), torch.randint(0, 4, (8,), generator=g)
    curv = ts.Chain(layers, nn.CrossEntropyLoss()).curvature(X, y, kind=kind)
    twin = curv.spectral_curvature()
    assert twin.layout.dtype == torch.float64 and curv.spectral_curvature() is twin
    M = twin.to_dense()
    ev = torch.linalg.eigvalsh(M)
    ev32 = torch.linalg.eigvalsh(curv.to_dense().double())
    norm = float(ev.abs().max())
    for which, kw in (("largest", {}), ("smallest", {}), ("nearest", dict(near=0.011 * norm))):
        values = curv.eigvalsh(5, which, **kw)
        assert values.dtype == torch.float32
        values, vectors = curv.eigvalsh(5, which, eigenvectors=True, **kw)
        assert values.dtype == vectors.dtype == torch.float32
        exact, vec = spectrum.eigvalsh(twin, 5, which, eigenvectors=True, **kw)
        if which == "nearest":
            want = ev[(ev - kw["near"]).abs().argsort()[:5]].sort().values
            want32 = ev32[(ev32 - kw["near"]).abs().argsort()[:5]].sort().values
        else:
            want, want32 = (ev[-5:], ev32[-5:]) if which == "largest" else (ev[:5], ev32[:5])
        assert float((exact - want).abs().max()) <= 1e-10 * norm, which
        assert float((M @ vec - vec * exact).norm(dim=0).max()) <= 1e-10 * norm, which
        assert torch.equal(values, exact.float()) and torch.equal(vectors, vec.float()), which
        assert float((values.double() - want32).abs().max()) <= 1e-5 * norm, which
    for lower, upper in ((-1.01 * norm, -0.013 * norm), (0.011 * norm, 0.5 * norm), (0.5 * norm, 2 * norm)):
        assert float((ev - lower).abs().min()) > 1e-6 * norm and float((ev - upper).abs().min()) > 1e-6 * norm
        count = int(((ev >= lower) & (ev < upper)).sum())
        assert curv.eigenvalue_count(lower, upper) == count, (lower, upper)


def test_float32_gauss_newton_copy_keeps_the_small_eigenvalues():
    """Cross-entropy over 200 classes, Gauss–Newton on the dense route (which factors
    ``Λ = BBᵀ``): the float64 copy sets only the rounding negatives of the float32 ``Λ`` to
    zero. It was rebuilt from the float32 factor ``B``, which drops every eigenvalue below
    ``c·eps₃₂·‖Λ‖`` (307 of 800 here): 17 eigenvalues counted in ``[1e-6, 1e-5)·‖H‖``
    where the float32 matrix has 68, 0 in ``[1e-7, 1e-6)`` for 42."""
    torch.manual_seed(0)
    C, N = 200, 4
    layer = nn.Linear(3, C)
    with torch.no_grad():
        layer.weight.mul_(8.0)
    X, y = torch.randn(N, 3), torch.randint(0, C, (N,))
    curv = ts.Chain([layer.float()], nn.CrossEntropyLoss()).curvature(X.float(), y, kind="ggn", method="dense")
    low = curv.to_dense().double()
    ev = torch.linalg.eigvalsh(0.5 * (low + low.mT))
    norm = float(ev.abs().max())
    copy64 = curv.spectral_curvature().to_dense()
    assert float(torch.linalg.matrix_norm(copy64 - low, 2)) <= 1e-6 * norm
    for lo, hi in ((1e-7, 1e-6), (1e-6, 1e-5), (1e-5, 1e-4)):
        count = int(((ev >= lo * norm) & (ev < hi * norm)).sum())
        assert count > 10 and curv.eigenvalue_count(lo * norm, hi * norm) == count, (lo, hi)


def test_float32_negative_count_and_zero_bulk_at_float32s_rounding():
    """Softmax regression (a convex loss: ``H`` semidefinite) in float32: no negative
    eigenvalue, and the zero bulk of the histogram is the float64 curvature's. The float32
    null space, answered in float64, carries float32's rounding (−6e-9·‖H‖), which the
    float64 edge tolerance (~1e-11·‖H‖) counted as 1–3 negative eigenvalues."""
    for seed in range(4):
        torch.manual_seed(seed)
        layer = nn.Linear(20, 10)
        X, y = torch.randn(64, 20) * 3, torch.randint(0, 10, (64,))
        c64 = ts.Chain([copy.deepcopy(layer).double()], nn.CrossEntropyLoss()).curvature(X.double(), y)
        c32 = ts.Chain([layer.float()], nn.CrossEntropyLoss()).curvature(X.float(), y)
        assert c64.negative_count() == c32.negative_count() == 0
        ev = torch.linalg.eigvalsh(c32.spectral_curvature().to_dense())
        norm = float(ev.abs().max())
        edges = [-1.5 * norm, -1e-3 * norm, 1e-3 * norm, 1.5 * norm]
        h64, h32 = c64.spectral_histogram(edges), c32.spectral_histogram(edges)
        assert float(ev.min()) < -spectrum.edge_tolerance(c32.spectral_curvature())  # the noise the bulk must hold
        assert h32.zeros == h64.zeros > 0 and h32.counts.tolist() == h64.counts.tolist(), (h32, h64)


def trained_softmax_regression():
    """A float64 ``Linear(20, 10)`` near its minimum (3 000 steps of gradient descent) on
    features of scales 1 … 1e-2, and its data in float32."""
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    X = torch.randn(64, 20) * torch.logspace(0, -2, 20)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3000):
        opt.zero_grad()
        nn.functional.cross_entropy(layer(X), y).backward()
        opt.step()
    return layer, X.float(), y


def test_float32_zero_bulk_near_a_minimum():
    """Softmax regression trained near its minimum, float32: no negative eigenvalue. There
    the gradient lies in directions of low curvature and ``‖Hg‖/‖g‖`` is 500× below
    ``‖H‖``; a zero bulk scaled by that estimate counted the float32 null space's rounding
    (−2.6e-9·‖H‖) as a negative eigenvalue."""
    layer, X, y = trained_softmax_regression()
    c32 = ts.Chain([copy.deepcopy(layer).float()], nn.CrossEntropyLoss()).curvature(X, y)
    ev = torch.linalg.eigvalsh(c32.spectral_curvature().to_dense())
    norm = float(ev.abs().max())
    assert spectrum._norm_estimate(c32.spectral_curvature()) < 0.01 * norm  # the case this is about
    assert float(ev.min()) < -spectrum.edge_tolerance(c32.spectral_curvature())
    assert c32.negative_count() == 0


@pytest.mark.parametrize("scale", [1.0, 1e-14])
def test_zero_bulk_is_scale_free(scale):
    """The zero bulk's norm (8 Lanczos steps) is ‖H‖ whatever the loss's scale: the
    Lanczos breakdown test was absolute (``β ≤ 1e-14·max(1, |α|)``), so for ‖H‖ ≈ 2e-15
    it stopped after one step and took a Rayleigh quotient of 0.07·‖H‖ for ‖H‖."""
    layer, X, y = trained_softmax_regression()
    ce = nn.CrossEntropyLoss()

    def loss(z, t):
        return scale * ce(z, t)

    curv = ts.Chain([copy.deepcopy(layer).float()], loss).curvature(X, y)
    copy64 = curv.spectral_curvature()
    norm = float(torch.linalg.eigvalsh(copy64.to_dense()).abs().max())
    spectrum.zero_tolerance(copy64)
    assert 0.5 * norm <= copy64.spectrum_cache["zero_scale"] <= 1.01 * norm


def test_float32_histogram_zero_bulk_wider_than_the_bin_of_zero():
    """A bin of 0 narrower than float32's zero bulk: each bin gives up the bulk's
    eigenvalues it holds. They were all taken from the bin of 0: 2 eigenvalues counted in
    ``zeros`` and in the next bin, and a count of −2 in the bin of 0."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 200)
    with torch.no_grad():
        layer.weight.mul_(8.0)
    X, y = torch.randn(4, 3).float(), torch.randint(0, 200, (4,))
    curv = ts.Chain([layer.float()], nn.CrossEntropyLoss()).curvature(X, y, kind="ggn", method="dense")
    ev = torch.linalg.eigvalsh(curv.spectral_curvature().to_dense())
    norm = float(ev.abs().max())
    edges = spectrum.symlog_edges(-2 * norm, 2 * norm, 9, 1e-7 * norm)
    hist = curv.spectral_histogram(edges)
    dense = torch.tensor([int(((ev >= a) & (ev < b)).sum()) for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())])
    i = int(torch.searchsorted(edges, torch.zeros(1, dtype=edges.dtype), right=True)) - 1
    z = hist.tolerance
    assert z > float(edges[i + 1])  # the bulk is wider than the bin of 0
    bulk = torch.tensor([int(((ev >= max(a, -z)) & (ev < min(b, z))).sum()) for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())])
    assert bool((hist.counts >= 0).all()) and hist.zeros == int(((ev >= -z) & (ev < z)).sum()) > 0
    assert torch.equal(hist.counts, dense - bulk)


@pytest.mark.parametrize("middle", [0.0, -5.55e-17, -1e-30])
def test_float32_histogram_with_an_edge_at_zero(middle):
    """Edges with one at (or a rounding below) 0, as ``torch.linspace`` makes them: the
    float32 null space's rounding stays in ``zeros``. The bulk was cut to the bin of 0,
    whose left side is empty there (down to ``τ``): 4 rounding eigenvalues reported as
    negative, and, for an edge just below 0, a count of −15."""
    torch.manual_seed(0)
    layers = [m.float() for m in (nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))]
    X, y = torch.randn(4, 6).float(), torch.randint(0, 5, (4,))
    curv = ts.Chain(layers, nn.CrossEntropyLoss()).curvature(X, y, kind="ggn", method="riccati")
    ev = torch.linalg.eigvalsh(curv.spectral_curvature().to_dense())
    norm = float(ev.abs().max())
    edges = torch.tensor([-1.2, -0.3, middle, 0.3, 1.2], dtype=torch.float64) * norm
    hist = curv.spectral_histogram(edges)
    copy64 = curv.spectral_curvature()
    assert int(((ev >= -spectrum.zero_tolerance(copy64)) & (ev < -spectrum.edge_tolerance(copy64))).sum())  # the case
    z = hist.tolerance
    bulk = (ev >= -z) & (ev < z)
    dense = [int(((ev >= a) & (ev < b) & ~bulk).sum()) for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())]
    assert hist.counts.tolist() == dense and hist.zeros == int(bulk.sum()) > 0
    assert hist.counts[1] == curv.negative_count() == 0


def test_float32_loss_hessian_at_the_edge_of_its_rounding():
    """A float32 loss Hessian ``Λ`` whose negative eigenvalue sits at float32's tolerance:
    float32's check takes it as semidefinite (the curvature factors), and so does the
    float64 copy now. It decided again in float64, refused ``Λ``, and every spectral
    query raised the kernel route's ValueError."""
    g = torch.Generator().manual_seed(0)
    eps = torch.finfo(torch.float32).eps
    for _ in range(20000):
        Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
        f = 0.9 + 0.2 * torch.rand(1, generator=g, dtype=torch.float64).item()
        A = ((Q * torch.tensor([1.0, 0.5, -f * 3 * eps], dtype=torch.float64)) @ Q.mT).float()
        A = 0.5 * (A + A.mT)
        try:
            ts.routes.loss_factor_blocks(A, 1)
        except ValueError:
            continue
        lam = torch.linalg.eigvalsh(A.double())
        if float(lam.min()) < -3 * eps * float(lam.abs().max()):
            break
    else:
        pytest.fail("no loss Hessian at the edge found")

    def loss(z, t):  # ½ Σ_s (z_s − t_s)ᵀ A (z_s − t_s): Λ = blockdiag(A)
        d = z - t
        return 0.5 * torch.einsum("si,ij,sj->", d, A, d)

    torch.manual_seed(0)
    layers = [m.float() for m in [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]]
    X, y = torch.randn(6, 4).float(), torch.randn(6, 3).float()
    for method in ("kernel", "dense"):
        curv = ts.Chain(layers, loss).curvature(X, y, kind="ggn", method=method)
        ev = torch.linalg.eigvalsh(curv.to_dense().double())
        assert curv.negative_count() == 0
        assert torch.allclose(curv.eigvalsh(2).double(), ev[-2:], rtol=1e-5, atol=0), method


def test_float32_gauss_newton_of_a_nonconvex_loss():
    """A loss not convex in the output (``Σ cos(z − t)``), Gauss–Newton on the riccati
    route, float32: the spectral queries answer as in float64 (the copy took the loss
    Hessian's semidefinite factor, and raised the kernel route's ValueError)."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]
    X, y = torch.randn(6, 4), torch.randn(6, 3)

    def loss(z, t):
        return torch.cos(z - t).sum()

    c64 = ts.Chain([copy.deepcopy(m).double() for m in layers], loss).curvature(X.double(), y.double(), kind="ggn", method="riccati")
    c32 = ts.Chain([m.float() for m in layers], loss).curvature(X.float(), y.float(), kind="ggn", method="riccati")
    assert c32.negative_count() == c64.negative_count() > 0
    assert torch.allclose(c32.eigvalsh(2).double(), c64.eigvalsh(2), rtol=0, atol=1e-5)


def test_float32_copy_refused_up_front_by_the_memory_limit():
    """The float64 copy is checked against ``memory_limit`` before it is made (it was made,
    and kept, before the first factorization's own check refused)."""
    torch.manual_seed(0)
    layers = [m.float() for m in mlp([8, 32, 32, 4], seed=0)]
    X, y = torch.randn(8, 8).float(), torch.randint(0, 4, (8,))
    curv = ts.Chain(layers, nn.CrossEntropyLoss()).curvature(X, y)
    curv.memory_limit = 1e5  # below the copy, above nothing else asked so far
    with pytest.raises(ts.ResourceError, match="float64 copy"):
        curv.negative_count()
    curv.memory_limit = None
    assert curv.negative_count() == curv.spectral_curvature().negative_count()


def batch_problem(widths, seed, batch=16):
    """A tanh MLP of ``widths`` on a batch of ``batch`` samples (default initialization)."""
    g = torch.Generator().manual_seed(seed + 1)
    X, y = torch.randn(batch, widths[0], generator=g), torch.randint(0, widths[-1], (batch,), generator=g)
    return ts.Chain(mlp(widths, seed=seed), nn.CrossEntropyLoss()), X, y


def test_nearest_inside_a_dense_spectrum_converges():
    """σ = −1e-3·‖H‖ among the closely spaced eigenvalues of a batch-16 tanh MLP
    (P = 739), where ``H − σI`` is nearly singular. The unrefined solves of inverse
    iteration have a backward error of ~1e-11, which was a floor of the Ritz residuals
    above their tolerance: the search raised. A step that does not halve the residual now
    refines the next solves once."""
    chain, X, y = batch_problem([8, 16, 16, 16, 3], 2)
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    near = -1e-3 * norm
    values, vectors = chain.curvature(X, y).eigvalsh(4, "nearest", near=near, eigenvectors=True)
    ref = ev[(ev - near).abs().argsort()[:4]].sort().values
    assert (values - ref).abs().max() <= 1e-10 * norm
    assert (M @ vectors - vectors * values).norm(dim=0).max() <= 1e-10 * norm


@pytest.mark.parametrize("widths,seed,k", [([8, 16, 16, 16, 3], 0, 2), ([6, 10, 10, 10, 10, 10, 3], 0, 4)])
def test_certifying_counts_keep_off_the_eigenvalues(widths, seed, k, monkeypatch):
    """The counts that prove no eigenvalue was missed are made halfway between the k-th
    eigenvalue found and the next Ritz value, not next to the k-th: a count at a shift
    within ~1e-10 of an eigenvalue failed the inertia's condition test and took the
    pivoted KKT factorization (1.3 s instead of 0.1 s here, 19 s at P = 2 050, minutes at
    P = 7 000). Here the pivoted factorization is refused: the counts never need it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a count took the pivoted factorization")

    chain, X, y = batch_problem(widths, seed)
    M, ev = reference(chain, X, y, "hessian")
    monkeypatch.setattr(ts.elimination, "KKTFactorization", refuse)
    norm = float(ev.abs().max())
    near = 1e-3 * norm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = chain.curvature(X, y).eigvalsh(k, "nearest", near=near)
    ref = ev[(ev - near).abs().argsort()[:k]].sort().values
    assert (values - ref).abs().max() <= 1e-10 * norm


def linear_spectrum(eigs, d=500, extra=40):
    """A zero-weight ``Linear(d, 2)`` under cross-entropy, whose Hessian (= Gauss–Newton
    matrix) has the eigenvalues ``eigs``, ``extra`` more in [0.05, 0.6] and zeros."""
    import random

    rng = random.Random(0)
    eigs = list(eigs) + [rng.uniform(0.05, 0.6) for _ in range(extra)]
    X = torch.zeros(len(eigs), d)
    for i, e in enumerate(eigs):
        X[i, i] = math.sqrt(2 * e * len(eigs))
    linear = nn.Linear(d, 2, bias=False)
    nn.init.zeros_(linear.weight)
    return ts.Chain([linear], nn.CrossEntropyLoss()), X, torch.arange(len(eigs)) % 2


def test_nearest_certified_against_a_missed_nearer_eigenvalue():
    """A Gauss–Newton matrix (a zero-weight linear model) with eigenvalues 1, 2, 3 + 4e-10,
    40 in [0.05, 0.6] and zeros (P = 1 000); the 2 nearest σ = 2 are 1 and 2. σ is an
    eigenvalue: the shift factored moves off it and the search finds {2, 3 + 4e-10}; the
    window's count reveals the missed 1. The cluster check counted only up to halfway to
    the k-th distance and accepted the wrong pair (found by review); it counts up to the
    cluster now, and the search goes on to find the 1."""
    chain, X, y = linear_spectrum([1.0, 2.0, 3.0 + 4e-10])
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    for kind in ("hessian", "ggn"):
        values, vectors = chain.curvature(X, y, kind=kind).eigvalsh(2, "nearest", near=2.0, eigenvectors=True)
        ref = ev[(ev - 2.0).abs().argsort()[:2]].sort().values
        assert (values - ref).abs().max() <= 1e-10 * norm, kind
        assert (M @ vectors - vectors * values).norm(dim=0).max() <= 1e-10 * norm


def test_a_near_tie_across_the_target_is_not_a_cluster():
    """σ = 2 with 1 and 3 + 5e-11 on either side (P = 1 000): the shift moved off 2 finds
    3 + 5e-11 first, and the cluster check took it as a tie with the missed 1 (within
    4e-11·‖H‖ of the same distance) and returned [2, 3] (found by review). A cluster is on
    one side now; the other side is counted whole, and the search finds the 1."""
    chain, X, y = linear_spectrum([1.0, 2.0, 3.0 + 5e-11])
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    for kind in ("hessian", "ggn"):
        values = chain.curvature(X, y, kind=kind).eigvalsh(2, "nearest", near=2.0)
        assert (values - torch.tensor([1.0, 2.0])).abs().max() <= 1e-10 * norm, kind


@pytest.mark.parametrize("near", [1e300, 1e8, -1e8, -1e300])
def test_a_target_far_beyond_the_spectrum(near):
    """Every ``|λ − σ|`` rounds to one value for ``|σ| ≫ ‖H‖``: 1e300 returned two zeros
    instead of the largest (found by review), 1e5…1e30 raised. Beyond the certified bounds
    the nearest are the largest (smallest)."""
    chain, X, y = problem()
    M, ev = reference(chain, X, y, "hessian")
    values = chain.curvature(X, y).eigvalsh(3, "nearest", near=near)
    want = ev[-3:] if near > 0 else ev[:3]
    assert (values - want).abs().max() <= 1e-10 * float(ev.abs().max())


def test_searches_at_a_singular_shift_move_on_without_the_pivoted_factorization(monkeypatch):
    """σ = 0 on the null space of a batch-1 MLP's Hessian: the elimination breaks down
    there, and the eigenvalue search moved its shift on only after the pivoted KKT
    factorization had confirmed that ``H − σI`` is singular (2 of the 8 s of the 5
    nearest 0 at (64, 32, 1), before the KKT blocks were declared symmetric). The shift
    of a shift-invert search is only a pole: it moves on unconfirmed
    (``confirm_singular=False``) but for its last try. Here the pivoted factorization
    and the dense verdict are refused, and the answers are the dense ones."""

    def refuse(*args, **kwargs):
        raise AssertionError("a shift search confirmed a breakdown")

    chain, X, y = batch_problem([6, 10, 10, 3], 0, batch=1)
    M, ev = reference(chain, X, y, "hessian")
    curv = chain.curvature(X, y)
    with pytest.raises(ts.SingularSystemError, match="not confirmed"):
        curv.factorize(shift=0.0, confirm_singular=False)  # the breakdown is there
    monkeypatch.setattr(ts.elimination.factor, "KKTFactorization", refuse)
    monkeypatch.setattr(ts.Curvature, "_dense_spectrum", refuse)
    norm = float(ev.abs().max())
    values, vectors = curv.eigvalsh(4, "nearest", near=0.0, eigenvectors=True)
    ref = ev[ev.abs().argsort()[:4]].sort().values
    assert (values - ref).abs().max() <= 1e-10 * norm
    assert (M @ vectors - vectors * values).norm(dim=0).max() <= 1e-10 * norm


@pytest.mark.parametrize("value", [None, 0, "no"])
def test_confirm_singular_takes_a_bool_only(value):
    chain, X, y = batch_problem([6, 10, 3], 0, batch=1)
    with pytest.raises(TypeError, match="confirm_singular"):
        chain.curvature(X, y).factorize(shift=0.5, confirm_singular=value)


def test_values_alone_keep_the_lanczos_basis_semi_orthogonal(monkeypatch):
    """``eigvalsh`` without eigenvectors: Lanczos on ``H`` passes over the whole basis
    only where the estimated loss of orthogonality would exceed ``√eps`` (partial
    reorthogonalization); the basis stays within ``√eps`` of orthonormal, and the values
    are those of the fully reorthogonalized search with eigenvectors and of dense."""
    chain, X, y = batch_problem([6, 12, 12, 12, 4], 3, batch=8)
    M, ev = reference(chain, X, y, "hessian")
    norm = float(ev.abs().max())
    passes = []
    step = spectrum._SemiOrthogonality.step

    def recording(self, *args):
        passes.append(step(self, *args))
        return passes[-1]

    monkeypatch.setattr(spectrum._SemiOrthogonality, "step", recording)
    basis = []
    hvp = ts.Curvature.hvp

    def recording_hvp(self, x, *args, **kwargs):
        if x.dim() == 1:
            basis.append(x.clone())
        return hvp(self, x, *args, **kwargs)

    monkeypatch.setattr(ts.Curvature, "hvp", recording_hvp)
    for which, want in (("largest", ev[-5:]), ("smallest", ev[:5])):
        passes.clear()
        basis.clear()
        values = chain.curvature(X, y).eigvalsh(5, which)
        assert (values - want).abs().max() <= 1e-10 * norm
        V = torch.stack(basis[-len(passes):])  # the Lanczos vectors, one HVP a step
        loss = float((V @ V.mT - torch.eye(V.shape[0])).abs().max())
        assert len(passes) > 20 and not all(passes) and loss <= torch.finfo(torch.float64).eps ** 0.5
        vectors_too = chain.curvature(X, y).eigvalsh(5, which, eigenvectors=True)[0]
        assert (values - vectors_too).abs().max() <= 1e-13 * norm


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_values_of_a_two_scale_spectrum_come_from_lanczos_on_h(which, seed, monkeypatch):
    """Linear regression with two input columns 1e4× the others (eigenvalues from ~1e9 down
    to ~1): a semi-orthogonal basis (loss ~1e-9) leaves the Ritz vectors residuals of
    ~1e-9·‖H‖, above what the Kato–Temple bounds of the small values need. The search
    starts again with full reorthogonalization, as on models of one scale it need not;
    it fell through to shift-invert Lanczos (19 of 20 such queries), slower."""

    def refuse(*args, **kwargs):
        raise AssertionError("shift-invert Lanczos took over")

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.randn(100, 30, generator=gen)
    X[:, :2] *= 1e4
    y = torch.randn(100, 1, generator=gen)
    chain = ts.Chain([nn.Linear(30, 1)], nn.MSELoss())
    M, ev = reference(chain, X, y, "hessian")
    monkeypatch.setattr(spectrum, "_shift_invert", refuse)
    values = chain.curvature(X, y).eigvalsh(3, which)
    want = ev[:3] if which == "smallest" else ev[-3:]
    assert (values - want).abs().max() <= 1e-10 * float(ev.abs().max())
