"""Deferred oracles in a chain: built only where something reads their operators, checked
by their sizes, exact wherever they are read (Hessian and Gauss–Newton)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny.blocks.elementwise import TanhBlock
from tallskinny.blocks.protocol import DeferredOracle
from tallskinny.testing import dense_ggn, dense_hessian

from models import mlp


def _chain(depth=6, width=4):
    torch.manual_seed(0)
    chain = ts.Chain(mlp(depth, width, width, 3, act="tanh"), nn.CrossEntropyLoss())
    return chain, torch.randn(1, width, dtype=torch.float64), torch.tensor([2])


class WrongSizes(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        a = o.sizes[0]
        return DeferredOracle(o.__dict__["_build"], (a, a, 1), diagonal=o.diagonal)


def test_the_chain_checks_a_deferred_oracles_sizes():
    chain, X, y = _chain()
    chain.blocks[1] = WrongSizes(chain.modules[1])
    with pytest.raises(ValueError, match=r"block 1 \(Tanh\) has sizes"):
        chain.curvature(X, y)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_solves_and_products_through_runs_build_no_run_oracle(kind):
    chain, X, y = _chain()
    curv = chain.curvature(X, y, kind=kind)
    run = curv.oracles[:-1]  # the (Linear, Tanh) pairs; the last Linear is alone
    assert all(isinstance(o, DeferredOracle) for o in run)
    if kind == "ggn":  # the Gauss–Newton hints drop C and E
        assert all(o.linear[2] is None for o in run[0::2]) and all(o.diagonal[1] is None for o in run[1::2])
    b = torch.randn(curv.num_parameters, dtype=torch.float64)
    x = curv.solve(b, 1e-2)
    assert not any(o.built for o in run)
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    M = H + 1e-2 * torch.eye(H.shape[0], dtype=torch.float64)
    assert ((x - torch.linalg.solve(M, b)).norm() / x.norm()).item() <= 1e-10
    # P columns at once go through the runs too (one m × P product per layer and sweep)
    assert ((curv.to_dense() - H).abs().max() / H.abs().max()).item() <= 1e-12
    assert not any(o.built for o in run)
    # the operators, once read, are made (their exactness: tests/blocks, check_block)
    assert all(o.G.shape[0] == o.sizes[1] for o in run) and all(o.built for o in run)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_gradient_from_the_adjoints_without_building_run_oracles(kind):
    """The gradient is Σ G_lᵀ g_l from the adjoints (autograd is not asked for it): equal to
    torch.func's, and read from the hints of the run's Linear blocks."""
    from tallskinny.testing import dense_gradient

    chain, X, y = _chain()
    curv = chain.curvature(X, y, kind=kind)
    g = curv.gradient()
    torch.testing.assert_close(g, dense_gradient(chain, X, y), rtol=1e-12, atol=1e-14)
    assert not any(o.built for o in curv.oracles[:-1])
    assert curv.gradient() is g  # made once
