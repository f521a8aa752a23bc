"""Activation oracles computed together (one derivative call for many blocks) must equal
the blocks' own oracles, and only exact built-in classes may be batched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tallskinny.blocks import block_for
from tallskinny.blocks.elementwise import TanhBlock, batch_key, oracles_together

f64 = torch.float64

MODULES = [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.SiLU, lambda: nn.Softplus(beta=2.0, threshold=3.0), nn.GELU,
           lambda: nn.GELU(approximate="tanh")]


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize("second_order", [True, False])
def test_together_equals_one_by_one(make, second_order):
    gen = torch.Generator().manual_seed(0)
    blocks = [block_for(make()) for _ in range(3)]
    shapes = [(1, 4), (2, 3), (5,)]  # sizes differ: the inputs are concatenated flat
    zs = [torch.randn(*s, generator=gen, dtype=f64) for s in shapes]
    gs = [torch.randn(*s, generator=gen, dtype=f64) for s in shapes]
    zs[0][0, 1] = 0.0  # ReLU's kink
    assert len({batch_key(b) for b in blocks}) == 1
    together = oracles_together(blocks, zs, [[]] * 3, gs, second_order=second_order)
    for b, z, g, o in zip(blocks, zs, gs, together):
        ref = b.oracle(z, [], g, second_order=second_order)
        assert o.sizes == ref.sizes
        # (elementwise rules: equal up to the last bit a vectorised tail may change)
        for field in "GFACE":
            torch.testing.assert_close(getattr(o, field).to_dense(), getattr(ref, field).to_dense(), rtol=1e-14, atol=0)
        d, e = o.diagonal
        torch.testing.assert_close(d, ref.diagonal[0], rtol=1e-14, atol=0)
        assert (e is None) == (ref.diagonal[1] is None)


def test_only_exact_builtin_classes_with_one_rule_share_a_key():
    class Custom(TanhBlock):
        pass

    assert batch_key(Custom(nn.Tanh())) is None
    assert batch_key(block_for(nn.Identity())) is None
    assert batch_key(block_for(nn.GELU())) != batch_key(block_for(nn.GELU(approximate="tanh")))
    assert batch_key(block_for(nn.Softplus(beta=1.0))) != batch_key(block_for(nn.Softplus(beta=2.0)))
    assert batch_key(block_for(nn.Tanh())) == batch_key(block_for(nn.Tanh()))
