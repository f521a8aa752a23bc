"""The workspace pool: large internal buffers are reused once their owner is gone, never
while it lives, and reusing them changes no result."""

from __future__ import annotations

import gc

import torch
from torch import nn

import tallskinny as ts
from tallskinny.elimination.stages import run as run_stage
from tallskinny.elimination import workspace


def _deep_chain(depth=12, width=48):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width).double(), nn.Tanh()]
    layers.append(nn.Linear(width, 3).double())
    X = torch.randn(1, width, dtype=torch.float64)
    return ts.Chain(layers, nn.CrossEntropyLoss()), X, torch.tensor([1])


def _run_buffers(fact):
    runs = [f for _, _, f in fact._inner._sweep_plan()[0] if isinstance(f, run_stage.BatchedRun)]
    assert len(runs) == 1
    run = runs[0]  # (the pivots and their LU factors have one shape: the pool may swap them)
    return {run.pivots.data_ptr(), run.lu._base.data_ptr(), run.K._base.data_ptr(), run.A[0].data_ptr()}


def test_buffers_are_reused_after_their_owner_is_gone_and_never_before():
    workspace.clear()
    chain, X, y = _deep_chain()
    curv = chain.curvature(X, y)
    b = torch.randn(curv.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = curv.factorize(1e-3)
    x_first = first.solve(b)
    live = _run_buffers(first)
    second = curv.factorize(1e-3)  # the first is alive: fresh buffers
    assert not live & _run_buffers(second)
    assert torch.equal(second.solve(b), x_first)
    del first
    gc.collect()
    assert workspace._held > 0  # the first factorization's buffers are in the pool
    third = curv.factorize(1e-3)
    assert _run_buffers(third) == live  # ... and reused
    assert not _run_buffers(third) & _run_buffers(second)
    assert torch.equal(third.solve(b), x_first)
    assert torch.equal(third.logdet(), second.logdet())


def test_inverse_hvp_repeated_gives_the_same_answer_bit_for_bit():
    workspace.clear()
    chain, X, y = _deep_chain()
    P = sum(p.numel() for m in chain.modules for p in m.parameters())
    b = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = [chain.inverse_hvp(X, y, b, damping=1e-3) for _ in range(3)]
    assert workspace._held > 0
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_the_pool_holds_at_most_its_limit(monkeypatch):
    workspace.clear()
    monkeypatch.setattr(workspace, "LIMIT_BYTES", 3 * workspace.MIN_BYTES)

    class Owner:
        pass

    owners = [Owner() for _ in range(5)]
    for o in owners:
        workspace.recycle(o, torch.empty(workspace.MIN_BYTES // 8, dtype=torch.float64))
    workspace.recycle(owners[0], torch.empty(4))  # too small to pool: ignored
    del owners, o
    gc.collect()
    assert workspace._held == 3 * workspace.MIN_BYTES
    t = workspace.empty((workspace.MIN_BYTES // 8,), torch.zeros((), dtype=torch.float64))
    assert workspace._held == 2 * workspace.MIN_BYTES and t.dtype == torch.float64
    workspace.clear()
    assert workspace._held == 0


def test_a_run_keeps_its_input_hessian_while_the_pool_is_reused(monkeypatch):
    """The value Hessian entering a run is kept (the run's inertia replays its loop from
    it): later factorizations, which take and give back pooled buffers (every buffer,
    here), leave it intact."""
    from tallskinny.testing import dense_hessian

    workspace.clear()
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    chain, X, y = _deep_chain(depth=6, width=8)
    curv = chain.curvature(X, y)
    first = curv.factorize(1.0)  # the run's span pivots have mixed signs here (5 negative)
    for damping in (0.1, 1e-3, 1e-2):  # each takes buffers from the pool and gives them back
        curv.factorize(damping).logdet()
    for buffers in workspace._free.values():  # nothing alive may read a pooled buffer
        for t in buffers:
            t.fill_(float("nan"))
    eig = torch.linalg.eigvalsh(dense_hessian(chain, X, y) + torch.eye(curv.num_parameters, dtype=torch.float64))
    assert tuple(first.inertia()) == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
    workspace.clear()


def test_tensors_with_autograd_history_are_never_pooled():
    workspace.clear()
    leaf = torch.zeros(workspace.MIN_BYTES // 8, dtype=torch.float64, requires_grad=True)
    workspace.give(leaf)
    workspace.give(leaf * 2)  # has a grad_fn
    view = torch.zeros(2 * workspace.MIN_BYTES // 8, dtype=torch.float64)[::2]
    workspace.give(view)  # a view: its base may be in use
    assert workspace._held == 0
