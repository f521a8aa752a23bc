"""``linalg.gmres``: right-preconditioned, column-parallel GMRES (the inner solver of the
mixed-precision refinement)."""

from __future__ import annotations

import pytest
import torch

from tallskinny.linalg.gmres import gmres


def _problem(n=40, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64) * 4 + torch.randn(n, n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return A, b, gen


def test_converges_to_its_tolerance_with_a_perturbed_inverse():
    """A float32 inverse as the preconditioner (as the mixed solve's factors): the true
    residual is at the requested level, in far fewer steps than the order."""
    A, b, _ = _problem()
    M_inv = torch.linalg.inv(A.float())
    d, steps = gmres(lambda v: A @ v, lambda v: (M_inv @ v.float()).double(), b, rtol=1e-12, maxiter=30)
    residual = (b - A @ d).norm(dim=0) / b.norm(dim=0)
    assert float(residual.max()) <= 1e-11
    assert steps <= 6


def test_exact_preconditioner_takes_one_step():
    A, b, _ = _problem(k=2)
    d, steps = gmres(lambda v: A @ v, lambda v: torch.linalg.solve(A, v), b, rtol=1e-10, maxiter=10)
    assert steps == 1
    assert torch.allclose(d, torch.linalg.solve(A, b), rtol=1e-10, atol=0)


def test_indefinite_symmetric_without_preconditioner_is_the_minimal_residual():
    """Against the dense minimiser of ‖b − A Z y‖ over the same Krylov space."""
    gen = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64)).Q
    A = Q @ torch.diag(torch.linspace(-2, 3, 30, dtype=torch.float64)) @ Q.mT
    b = torch.randn(30, 1, generator=gen, dtype=torch.float64)
    d, steps = gmres(lambda v: A @ v, lambda v: v, b, rtol=1e-30, maxiter=6)
    assert steps == 6
    K = torch.cat([torch.linalg.matrix_power(A, i) @ b for i in range(6)], dim=1)
    y = torch.linalg.lstsq(A @ K, b).solution
    assert float((b - A @ d).norm()) == pytest.approx(float((b - A @ K @ y).norm()), rel=1e-8)


def test_zero_column_and_columns_converge_together():
    A, b, _ = _problem(k=3)
    b[:, 1] = 0
    M_inv = torch.linalg.inv(A.float())
    d, _ = gmres(lambda v: A @ v, lambda v: (M_inv @ v.float()).double(), b, rtol=1e-12, maxiter=30)
    assert torch.equal(d[:, 1], torch.zeros_like(d[:, 1]))
    assert float((b - A @ d).norm() / b.norm()) <= 1e-11


def test_stagnation_stops_early():
    """The cyclic shift: GMRES from e₁ makes no progress before step n; with
    ``stagnation=3`` it gives up after 3 steps, without it runs to ``maxiter``."""
    n = 20
    A = torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=0)
    b = torch.zeros(n, 1, dtype=torch.float64)
    b[0] = 1
    _, steps = gmres(lambda v: A @ v, lambda v: v, b, rtol=1e-10, maxiter=10, stagnation=3)
    assert steps == 3
    _, steps = gmres(lambda v: A @ v, lambda v: v, b, rtol=1e-10, maxiter=10)
    assert steps == 10


def test_maxiter_must_be_positive():
    A, b, _ = _problem()
    with pytest.raises(ValueError, match="maxiter"):
        gmres(lambda v: A @ v, lambda v: v, b, rtol=1e-8, maxiter=0)
