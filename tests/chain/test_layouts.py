"""Blocks declare the layout of their parameters; the engine never guesses it.

With one output unit, ``θ = [vec(W), b]`` of ``nn.Linear(n, 1)`` and ``θ = vec(W)`` of
``nn.Linear(n + 1, 1, bias=False)`` have the same index order, so reading the layout off
the permutation took a bias-free one-output head for one with a bias (single-vector
HVPs off by 0.47, gradients by 0.66, before the layout was declared)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny.testing import dense_ggn, dense_gradient, dense_hessian


HEADS = {
    "linear": lambda: ([nn.Linear(3, 1, bias=False)], torch.randn(2, 3)),
    "mlp": lambda: ([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1, bias=False)], torch.randn(5, 4)),
    "conv": lambda: ([nn.Conv1d(2, 1, 3, bias=False), nn.Flatten(), nn.Linear(4, 1, bias=False)], torch.randn(3, 2, 6)),
}


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("name", HEADS)
def test_bias_free_one_output_heads(name, kind):
    torch.manual_seed(0)
    modules, X = HEADS[name]()
    y = torch.randn(X.shape[0], 1)
    chain = ts.Chain(modules, nn.MSELoss())
    curv = chain.curvature(X, y, kind=kind)
    H = (dense_hessian if kind == "hessian" else dense_ggn)(chain, X, y)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
    assert (curv.hvp(v) - H @ v).norm() <= 1e-12 * (H @ v).norm()  # one vector: the fused products
    assert (curv.hvp(v[:, None]) - H @ v[:, None]).norm() <= 1e-12 * (H @ v).norm()
    g = dense_gradient(chain, X, y)
    assert (curv.gradient() - g).norm() <= 1e-12 * g.norm()
    M = H + 1e-2 * torch.eye(H.shape[0])
    x = chain.inverse_hvp(X, y, v, damping=1e-2, kind=kind)
    assert (x - torch.linalg.solve(M, v)).norm() <= 1e-10 * torch.linalg.solve(M, v).norm()
