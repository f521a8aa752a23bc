"""The value Hessian kept on its support (tallskinny.elimination.supported); a chain of
convolutions and ReLUs passes one between its stages in the conv plugin's
``test_conv_chains.py``."""

from __future__ import annotations

import pytest
import torch

from tallskinny.elimination.supported import Supported, buffer, dense


def _supported(n=7, index=(1, 2, 4, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.tensor(index)
    values = torch.randn(len(index), len(index), generator=gen, dtype=torch.float64)
    values = values + values.mT
    reference = torch.zeros(n, n, dtype=torch.float64)
    reference[index.unsqueeze(1), index] = values
    return Supported(values, index, n), reference


def test_dense_embeds_the_block_in_zeros():
    S, reference = _supported()
    assert torch.equal(S.dense(), reference) and torch.equal(dense(S), reference)
    plain = torch.ones(3, 3)
    assert dense(plain) is plain
    assert buffer(S) is S.values and buffer(plain) is plain


@pytest.mark.parametrize("index", [(1, 2, 4, 6), (0, 2, 4), (0, 3, 5), (1, 2, 3, 4, 5, 6), ()])
def test_block_reads_any_rows_and_columns(index):
    S, reference = _supported()
    index = torch.tensor(index, dtype=torch.long)
    got = S.block(index)
    assert torch.equal(got, reference[index.unsqueeze(1), index])
    if torch.equal(index, S.index):
        assert got is S.values  # the same indices: no copy


def test_a_diagonal_stage_scales_the_block_and_keeps_the_support():
    """``diag(d) S diag(d)`` of a supported ``S`` (``E = 0``): the scaled block on the same
    support, equal to the dense congruence, symmetric bit for bit."""
    from tallskinny.blocks.protocol import Oracle
    from tallskinny.elimination.stages.activation import ActivationStage
    from tallskinny.linalg import Diagonal, Zero

    S, reference = _supported()
    d = torch.tensor([0.0, 0.5, -2.0, 0.0, 3.0, 1.0, 0.25], dtype=torch.float64)
    n = d.shape[0]
    oracle = Oracle(G=Zero(n, 0), F=Diagonal(d), A=Zero(0, 0), C=Zero(0, n), E=Zero(n, n))
    stage = ActivationStage(oracle)
    assert stage.takes_supported
    out, factor = stage.eliminate(S, 1e-3, 0)
    assert factor is None and isinstance(out, Supported) and torch.equal(out.index, S.index)
    torch.testing.assert_close(out.dense(), torch.diag(d) @ reference @ torch.diag(d), rtol=1e-15, atol=0)
    assert torch.equal(out.values, out.values.mT)
    with_E = ActivationStage(Oracle(G=Zero(n, 0), F=Diagonal(d), A=Zero(0, 0), C=Zero(0, n), E=Diagonal(d)))
    assert not with_E.takes_supported  # E ≠ 0 may fill the zeros: the riccati loop densifies first
