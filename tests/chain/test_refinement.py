"""The refinement policy of ``Factorization.solve``: automatic by default, explicit on request."""

from __future__ import annotations

import pytest
import torch

import tallskinny as ts
from models import make_case
from tallskinny.testing import dense_hessian


def _setup(name, seed):
    modules, loss, X, y = make_case(name, seed)
    chain = ts.Chain(modules, loss)
    return chain.curvature(X, y), dense_hessian(chain, X, y)


def _backward_error(M, x, b):
    return ((b - M @ x).norm() / (torch.linalg.matrix_norm(M, 2) * x.norm() + b.norm())).item()


def test_moderate_damping_needs_no_refinement():
    """At ε = 0.1 the unrefined solve is backward stable: the check finds nothing to do."""
    curv, H = _setup("tanh", 1)
    fact = curv.factorize(0.1)
    b = torch.randn(curv.num_parameters, generator=torch.Generator().manual_seed(0))
    x0 = fact.solve(b, refine=0)
    M = H + 0.1 * torch.eye(H.shape[0])
    assert _backward_error(M, x0, b) <= ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    assert torch.equal(fact.solve(b), x0)


@pytest.mark.parametrize("seed", [1, 3])
def test_small_damping_refines_and_is_accurate(seed):
    """ReLU nets at ε = 1e-6: without refinement the error is far above eps·cond (the
    elimination does not pivot across blocks); the default sees the backward error and refines."""
    curv, H = _setup("relu", seed)
    damping = 1e-6
    fact = curv.factorize(damping)
    M = H + damping * torch.eye(H.shape[0])
    eig = torch.linalg.eigvalsh(M)
    cond = (eig.abs().max() / eig.abs().min()).item()
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.solve(M, b)
    err = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    tol = 10 * torch.finfo(torch.float64).eps * cond
    assert err(fact.solve(b, refine=0)) > tol  # the step is needed here, not decoration
    x = fact.solve(b)
    assert err(x) <= tol
    assert _backward_error(M, x, b) <= ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    assert err(fact.solve(b, refine=2)) <= tol


def test_check_is_per_column():
    """With k right-hand sides, one column above tolerance is enough to refine."""
    curv, H = _setup("relu", 1)
    fact = curv.factorize(1e-6)
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(H.shape[0], 3, generator=gen)
    X = fact.solve(B)
    for j in range(3):
        torch.testing.assert_close(X[:, j], fact.solve(B[:, j]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_refine_values(bad):
    curv, _ = _setup("tanh", 1)
    with pytest.raises(ValueError, match="refine"):
        curv.factorize(0.1).solve(torch.zeros(curv.num_parameters), refine=bad)


@pytest.mark.parametrize("width", [3, 6])
@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.ReLU, torch.nn.Sigmoid])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_diagonal_block_bound_is_a_lower_bound_of_the_norm(width, act, kind):
    """The bound the check falls back on before refining, ``σ_l²·max_j‖S̄_l e_j‖`` over the
    one-sample affine layers, never exceeds ``‖H‖₂`` (an overestimate would hide backward
    errors) and is not trivially zero; at batch 2 no stage qualifies and it is 0."""
    torch.manual_seed(width)
    modules = [torch.nn.Linear(4, width), act(), torch.nn.Linear(width, width), act(), torch.nn.Linear(width, 3)]
    chain = ts.Chain(modules, torch.nn.CrossEntropyLoss())
    for batch in (1, 2):
        X, y = 2 * torch.randn(batch, 4), torch.randint(0, 3, (batch,))
        curv = chain.curvature(X, y, kind=kind)
        bound = curv._diagonal_block_bound()
        norm = torch.linalg.matrix_norm(curv.to_dense(), 2).item()
        if batch == 1:
            assert 0.05 * norm < bound <= norm * (1 + 1e-12)
        else:
            assert bound == 0.0
