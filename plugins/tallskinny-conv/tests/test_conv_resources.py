"""A convolutional chain whose curvature would not fit is refused before its oracles
(issue #14, "Resources"; the chain-level cases are in tests/chain/test_resources.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny.blocks.linear import LinearBlock
from tallskinny_conv.conv import ConvBlock


def test_a_batch_8_convolution_is_refused_before_the_oracles(monkeypatch):
    """Conv2d(64 → 64, 3×3) on 8 × 64 × 32 × 32 then Linear(65 536 → 10): the Linear's
    oracle alone forms its (65 537 × 65 536) padded identity (34 GB); the curvature used to
    die in the allocator there."""

    def reached(*args, **kwargs):
        raise AssertionError("an oracle was reached: the curvature was not refused before the work")

    monkeypatch.setattr(ConvBlock, "oracle", reached)
    monkeypatch.setattr(LinearBlock, "oracle", reached)
    torch.manual_seed(0)
    chain = ts.Chain(
        [nn.Conv2d(64, 64, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64 * 32 * 32, 10)],
        nn.CrossEntropyLoss(),
    )
    X, y = torch.randn(8, 64, 32, 32), torch.randint(0, 10, (8,))
    with pytest.raises(ts.ResourceError) as info:
        chain.curvature(X, y, memory_limit=16e9)
    err = info.value
    assert err.estimate > 34e9 and err.limit == 16e9
    assert "block 3 (Linear): its oracle" in str(err) and "16.0 GB" in str(err)
    assert "kind='ggn' needs about" in str(err)  # the Gauss–Newton oracle has no C, and fits


def test_the_factorization_of_a_batch_of_convolutions_is_refused_before_the_elimination(monkeypatch):
    from tallskinny.testing import elimination_forbidden

    torch.manual_seed(0)
    chain = ts.Chain([nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10)],
                     nn.CrossEntropyLoss())
    X, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))  # 32 768 activations: S alone is 8.6 GB
    # the elimination's estimate (method="auto" takes the output kernel here, which fits)
    curv = chain.curvature(X, y, kind="ggn", method="riccati", memory_limit=4e9)
    assert chain.curvature(X, y, kind="ggn", memory_limit=4e9).method == "kernel"
    with elimination_forbidden(), pytest.raises(ts.ResourceError) as info:
        curv.factorize(1e-2)
    assert info.value.estimate > 32768**2 * 8
    assert "32 768" in info.value.largest and "a batch of at most" in str(info.value)
