"""``tallskinny.testing``: the dense references agree with each other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny.testing import dense_ggn, dense_hessian


def _layernorm_chain():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    modules = [nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4)]
    chain = ts.Chain([m.double() for m in modules], nn.CrossEntropyLoss())
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    return chain, X, y


@pytest.mark.parametrize("reference", [dense_hessian, dense_ggn])
def test_forward_outer_derivative_is_the_same_matrix(reference):
    chain, X, y = _layernorm_chain()
    H = reference(chain, X, y)
    H_forward = reference(chain, X, y, outer="forward")
    assert torch.linalg.matrix_norm(H, 2) > 1e-3  # not a trivial agreement
    assert float(torch.linalg.matrix_norm(H - H_forward, 2)) <= 1e-13 * float(torch.linalg.matrix_norm(H, 2))


@pytest.mark.parametrize("reference", [dense_hessian, dense_ggn])
def test_unknown_outer_mode_is_refused(reference):
    chain, X, y = _layernorm_chain()
    with pytest.raises(ValueError, match="outer"):
        reference(chain, X, y, outer="backward")
