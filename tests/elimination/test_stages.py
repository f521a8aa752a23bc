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
def test_masked_kronecker_basis_of_a_convolution_span(smallest):
    """``G = I_m ⊗ B`` with dead rows (``B = UΣ`` square with orthogonal columns, a
    convolution's span at one sample): per channel an orthonormal basis ``V`` of the live
    rows' row space (``Y V Vᵀ = Y``), ``G V = Y V`` with orthogonal columns (the span
    pivot's scaling), its live blocks, ``‖G‖₂``, and the rank: every live row where ``Σ`` is
    well above rounding, one fewer in a channel with every row live and a column of
    norm 1e-20."""
    from tallskinny.elimination.stages.dense import masked_kronecker_basis

    gen = torch.Generator().manual_seed(7)
    R, m = 12, 3
    B = _orthogonal_columns(R, gen, smallest)
    dead = torch.rand(m * R, generator=gen) < 0.5
    dead[:R] = True  # a dead channel
    dead[R : R + 2] = False
    dead[2 * R :] = False  # a channel with every row live
    V_blocks, GV, g_norm, live_blocks = masked_kronecker_basis(B, dead)
    offset = 0
    for c, V in enumerate(V_blocks):
        rows = dead[c * R : (c + 1) * R]
        Y = B.masked_fill(rows.unsqueeze(1), 0.0)
        k = V.shape[1]
        if smallest > 1e-3:
            assert k == int((~rows).sum())
        torch.testing.assert_close(V.mT @ V, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-14)
        torch.testing.assert_close(Y @ V @ V.mT, Y, rtol=0, atol=1e-13)
        block = GV[c * R : (c + 1) * R, offset : offset + k]
        torch.testing.assert_close(block, Y @ V, rtol=0, atol=1e-13)
        gram = block.mT @ block
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-13)
        assert torch.equal(live_blocks[c], block[~rows])
        offset += k
    assert offset == GV.shape[1]
    assert V_blocks[2].shape[1] == (R if smallest > 1e-3 else R - 1)
    assert abs(g_norm - float(torch.linalg.matrix_norm(GV, 2))) <= 1e-12 * g_norm
