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


def test_moderate_damping_needs_no_refinement():
    curv, _ = _setup("tanh", 1)
    fact = curv.factorize(0.1)
    assert fact._inner.amplification * torch.finfo(torch.float64).eps <= ts.curvature.REFINE_TOLERANCE
    b = torch.randn(curv.num_parameters, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fact.solve(b), fact.solve(b, refine=0))


def test_tiny_damping_refines_and_is_accurate():
    """ReLU net at ε = 1e-8: without refinement the error is far above eps·cond; the
    default detects the 1/ε amplification and refines."""
    curv, H = _setup("relu", 2)
    damping = 1e-8
    fact = curv.factorize(damping)
    assert fact._inner.amplification * torch.finfo(torch.float64).eps > ts.curvature.REFINE_TOLERANCE
    M = H + damping * torch.eye(H.shape[0])
    eig = torch.linalg.eigvalsh(M)
    cond = (eig.abs().max() / eig.abs().min()).item()
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.solve(M, b)
    err = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    tol = 10 * torch.finfo(torch.float64).eps * cond
    assert err(fact.solve(b)) <= tol
    assert err(fact.solve(b, refine=0)) > tol  # the step is needed here, not decoration
    assert err(fact.solve(b, refine=2)) <= tol


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_refine_values(bad):
    curv, _ = _setup("tanh", 1)
    with pytest.raises(ValueError, match="refine"):
        curv.factorize(0.1).solve(torch.zeros(curv.num_parameters), refine=bad)
