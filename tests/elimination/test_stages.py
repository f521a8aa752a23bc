"""The stage protocol (``tallskinny/elimination/stages/__init__.py``): every stage the
preparation makes is a ``Stage``, every factor a ``StageFactor``, and the sweeps' plan
reads ``blocks`` to skip the blocks a run covers."""

from __future__ import annotations

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
