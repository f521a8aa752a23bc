"""The exact trust-region subproblem solver against a dense eigendecomposition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tallskinny as ts
from dense_reference import DenseOperator, model_value, trust_region_reference
from tallskinny.trust_region import TrustRegionStep, solve_subproblem


def random_symmetric(n, eigenvalues, seed):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return Q @ torch.diag(eigenvalues) @ Q.T, Q, gen


def check_against_reference(H, g, radius, result: TrustRegionStep):
    x_ref, lam_ref = trust_region_reference(H, g, radius)
    xnorm = float(result.step.norm())
    assert xnorm <= radius * (1 + 1e-12)
    if lam_ref > 0:
        assert result.boundary
        assert abs(xnorm - radius) <= 1e-8 * radius
        assert abs(result.multiplier - lam_ref) <= 1e-6 * lam_ref
    else:
        assert result.multiplier <= 1e-9 * max(1.0, float(g.norm()) / radius)
    # the model value is optimal, and the step is the reference one unless the solution
    # is not unique (hard case: ±eigenvector)
    m, m_ref = model_value(H, g, result.step), model_value(H, g, x_ref)
    assert abs(m - m_ref) <= 1e-9 * abs(m_ref)
    assert abs(result.model_decrease + m) <= 1e-9 * abs(m)
    if not result.hard_case:
        assert float((result.step - x_ref).norm()) <= 1e-8 * float(x_ref.norm())
    # the optimality system: (H + λI) x = −g
    residual = H @ result.step + result.multiplier * result.step + g
    if not result.hard_case:
        assert float(residual.norm()) <= 1e-8 * float(g.norm())


@pytest.mark.parametrize("seed", range(3))
def test_interior_solution(seed):
    H, _, gen = random_symmetric(20, torch.linspace(0.5, 3.0, 20), seed)
    g = torch.randn(20, generator=gen)
    result = solve_subproblem(DenseOperator(H), g, radius=100.0)
    assert not result.boundary and result.multiplier == 0.0 and result.factorizations == 1
    check_against_reference(H, g, 100.0, result)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("radius", [1e-3, 0.3, 2.0])
def test_boundary_solution_positive_definite(seed, radius):
    H, _, gen = random_symmetric(25, torch.linspace(0.1, 5.0, 25), seed)
    g = torch.randn(25, generator=gen)
    result = solve_subproblem(DenseOperator(H), g, radius)
    assert result.boundary
    check_against_reference(H, g, radius, result)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [1e-2, 1.0, 50.0])
def test_indefinite(seed, radius):
    eigenvalues = torch.cat([torch.linspace(-2.0, -0.1, 6), torch.linspace(0.2, 4.0, 24)])
    H, _, gen = random_symmetric(30, eigenvalues, seed)
    g = torch.randn(30, generator=gen)
    result = solve_subproblem(DenseOperator(H), g, radius)
    assert result.multiplier > 2.0  # −λ_min
    check_against_reference(H, g, radius, result)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("multiplicity", [1, 2])
def test_hard_case(seed, multiplicity):
    eigenvalues = torch.cat([torch.full((multiplicity,), -1.5), torch.linspace(-1.0, 3.0, 20)])
    n = len(eigenvalues)
    H, Q, gen = random_symmetric(n, eigenvalues, seed)
    g = torch.randn(n, generator=gen)
    g = g - Q[:, :multiplicity] @ (Q[:, :multiplicity].T @ g)  # g ⟂ eigenspace of λ_min
    c = Q.T @ g
    norm_at_minus_lambda1 = float((c[multiplicity:] / (eigenvalues[multiplicity:] + 1.5)).norm())
    radius = 2.0 * norm_at_minus_lambda1
    result = solve_subproblem(DenseOperator(H), g, radius)
    assert result.hard_case and result.boundary
    assert abs(result.multiplier - 1.5) <= 1e-6 * 1.5
    check_against_reference(H, g, radius, result)


def test_zero_gradient_indefinite_moves_along_the_negative_eigenvector():
    H, Q, _ = random_symmetric(10, torch.linspace(-1.0, 2.0, 10), 0)
    result = solve_subproblem(DenseOperator(H), torch.zeros(10), 0.5)
    assert abs(float(result.step.norm()) - 0.5) <= 1e-8
    assert abs(abs(float(result.step @ Q[:, 0])) - 0.5) <= 1e-6
    assert abs(result.multiplier - 1.0) <= 1e-6


def test_singular_semidefinite_returns_the_minimum_norm_step():
    """λ* = 0 with H ⪰ 0 singular and g in its range: no null-space component is added."""
    gen = torch.Generator().manual_seed(1)
    eigenvalues = torch.cat([torch.zeros(5), torch.linspace(0.5, 2.0, 10)])
    perm = torch.randperm(15, generator=gen)
    H = torch.diag(eigenvalues[perm])  # exactly singular, like a Gauss–Newton matrix
    g = torch.randn(15, generator=gen) * (eigenvalues[perm] > 0)
    result = solve_subproblem(DenseOperator(H), g, 1e3)
    x_min_norm = -torch.linalg.pinv(H) @ g
    assert not result.boundary
    assert float((result.step - x_min_norm).norm()) <= 1e-8 * float(x_min_norm.norm())


@pytest.mark.parametrize("radius", [0, -1.0, math.inf, math.nan, "1"])
def test_bad_radius(radius):
    with pytest.raises((ValueError, TypeError), match="radius"):
        solve_subproblem(DenseOperator(torch.eye(3)), torch.ones(3), radius)


def test_bad_gradient():
    with pytest.raises(ValueError, match="gradient"):
        solve_subproblem(DenseOperator(torch.eye(3)), torch.ones(3, 1), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        solve_subproblem(DenseOperator(torch.eye(3)), torch.tensor([1.0, math.nan, 0.0]), 1.0)


# -- on chains: the curvature object is the operator ---------------------------------------
def small_chain(act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5), act(), nn.Linear(5, 5), act(), nn.Linear(5, 3)]
    chain = ts.Chain(layers, loss=nn.CrossEntropyLoss())
    X, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    return chain, X, y


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("radius", [1e-2, 0.5, 5.0])
def test_chain_curvature(kind, radius):
    chain, X, y = small_chain()
    curv = chain.curvature(X, y, kind=kind)
    H, g = curv.to_dense(), curv.gradient()
    result = solve_subproblem(curv, g, radius)
    check_against_reference(H, g, radius, result)


def test_chain_hessian_hard_case():
    chain, X, y = small_chain(seed=2)
    curv = chain.curvature(X, y)
    H = curv.to_dense()
    evals, Q = torch.linalg.eigh(H)
    assert evals[0] < -1e-3 and evals[1] - evals[0] > 1e-6 * abs(evals[0])
    g = curv.gradient()
    g = g - (g @ Q[:, 0]) * Q[:, 0]
    c = Q.T @ g
    radius = 1.5 * float((c[1:] / (evals[1:] - evals[0])).norm())
    result = solve_subproblem(curv, g, radius)
    assert result.hard_case
    assert abs(result.multiplier + float(evals[0])) <= 1e-6 * abs(float(evals[0]))
    check_against_reference(H, g, radius, result)


def test_relu_chain_singular_at_zero_does_not_crash():
    chain, X, y = small_chain(act=nn.ReLU, seed=3)
    with torch.no_grad():
        chain.modules[0].bias.fill_(-10.0)  # dead first layer: H is singular
    curv = chain.curvature(X, y)
    with pytest.raises(ts.SingularSystemError):
        curv.factorize(0.0)
    H, g = curv.to_dense(), curv.gradient()
    result = solve_subproblem(curv, g, 0.1)
    check_against_reference(H, g, 0.1, result)


@pytest.mark.parametrize("initial", [1e-3, 3.0, 1e3])
def test_warm_start_gives_the_same_solution(initial):
    eigenvalues = torch.cat([torch.linspace(-1.0, -0.1, 4), torch.linspace(0.2, 4.0, 16)])
    H, _, gen = random_symmetric(20, eigenvalues, 5)
    g = torch.randn(20, generator=gen)
    result = solve_subproblem(DenseOperator(H), g, 0.7, initial_multiplier=initial)
    check_against_reference(H, g, 0.7, result)
    with pytest.raises(ValueError, match="initial_multiplier"):
        solve_subproblem(DenseOperator(H), g, 0.7, initial_multiplier=-1.0)
