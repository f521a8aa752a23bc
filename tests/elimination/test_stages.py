"""The stage protocol (``tallskinny/elimination/stages/__init__.py``): every stage the
preparation makes is a ``Stage``, every factor a ``StageFactor``, and the sweeps' plan
reads ``blocks`` to skip the blocks a run covers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import elimination
from tallskinny.elimination.riccati import RiccatiFactorization
from tallskinny.elimination.stages import Stage, StageFactor
from tallskinny.elimination.stages.covered import COVERED
from tallskinny.elimination.stages.run import LinearRunStage


def _chain():
    torch.manual_seed(0)
    run = [m for _ in range(5) for m in (nn.Linear(6, 6), nn.Tanh())]  # a run of 5 pairs at one sample
    modules = [m.double() for m in (nn.Linear(4, 6), nn.Tanh(), *run, nn.LayerNorm(6), nn.Linear(6, 3))]
    return ts.Chain(modules, nn.CrossEntropyLoss()), torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])


def test_prepared_stages_and_their_factors_follow_the_protocol():
    chain, X, y = _chain()
    curv = chain.curvature(X, y)
    stages = elimination.prepare_stages(curv.oracles, curv.loss_oracle)
    assert all(isinstance(st, Stage) for st in stages)
    runs = [st for st in stages if isinstance(st, LinearRunStage)]
    assert runs and all(st.blocks == st.end - st.start for st in runs)
    fact = RiccatiFactorization(stages, curv.loss_oracle, 1e-2)
    plan, sizes = fact._sweep_plan()
    assert [end - start for start, end, _ in plan if end - start > 1] == [st.blocks for st in runs]
    assert all(stages[i] is COVERED for st in runs for i in range(st.start + 1, st.end))
    assert all(f is None or isinstance(f, StageFactor) for _, _, f in plan)
    assert sum(sizes) == curv.num_parameters


def _orthogonal_columns(n: int, gen: torch.Generator, smallest: float = 0.1) -> torch.Tensor:
    """A square ``U Σ`` (``U`` orthogonal, ``Σ`` from ``smallest`` to 2)."""
    U = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    return U * torch.linspace(smallest, 2.0, n, dtype=torch.float64)


@pytest.mark.parametrize("smallest", [0.1, 1e-20])
def test_masked_kronecker_basis_of_a_square_orthogonal_span(smallest):
    """``G = I_m ⊗ B`` with dead rows, ``B`` square with orthogonal columns (a convolution's
    span at one sample): each channel's live block has full row rank, and its basis comes
    from a QR, without an SVD. The basis is orthonormal and spans the row space
    (``Y V Vᵀ = Y``), ``G V`` is ``Y V``, ``‖G‖₂`` is bounded from above, and the ranks equal
    the SVD's. A column norm below the tolerance takes the SVD, which drops it."""
    from tallskinny.elimination.stages.dense import masked_kronecker_basis

    gen = torch.Generator().manual_seed(7)
    R, m = 12, 3
    B = _orthogonal_columns(R, gen, smallest)
    dead = torch.rand(m * R, generator=gen) < 0.5
    dead[:R] = True  # a dead channel
    dead[R : R + 2] = False
    dead[2 * R :] = False  # a channel with every row live: rank R unless a column norm is tiny
    V_blocks, GV, g_norm, live_blocks = masked_kronecker_basis(B, dead, orthogonal_columns=True)
    V_svd, GV_svd, g_svd, _ = masked_kronecker_basis(B, dead)
    assert [V.shape[1] for V in V_blocks] == [V.shape[1] for V in V_svd]
    assert g_norm >= g_svd * (1 - 1e-12)
    offset = 0
    for c, V in enumerate(V_blocks):
        Y = B.masked_fill(dead[c * R : (c + 1) * R].unsqueeze(1), 0.0)
        k = V.shape[1]
        if smallest > 1e-3:
            assert k == int((~dead[c * R : (c + 1) * R]).sum())
        torch.testing.assert_close(V.mT @ V, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-14)
        torch.testing.assert_close(Y @ V @ V.mT, Y, rtol=0, atol=1e-13)
        torch.testing.assert_close(GV[c * R : (c + 1) * R, offset : offset + k], Y @ V, rtol=0, atol=1e-13)
        assert torch.equal(live_blocks[c], GV[c * R : (c + 1) * R][~dead[c * R : (c + 1) * R], offset : offset + k])
        offset += k
    assert offset == GV.shape[1]
    assert V_blocks[2].shape[1] == (R if smallest > 1e-3 else R - 1)
