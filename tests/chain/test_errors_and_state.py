"""Bad input raises clear errors before any work; the user's model is never changed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tallskinny as ts
from models import make_case


@pytest.fixture
def setup():
    modules, loss, X, y = make_case("tanh", 1)
    return ts.Chain(modules, loss), modules, loss, X, y


def test_empty_chain_and_bad_loss():
    with pytest.raises(ValueError, match="at least one module"):
        ts.Chain([], nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="loss must be"):
        ts.Chain([nn.Linear(2, 2)], loss=3)


def test_strict_names_the_unsupported_module():
    class Mine(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(ts.blocks.UnsupportedModuleError, match="Mine"):
        ts.Chain([nn.Linear(2, 2), Mine()], nn.MSELoss(), strict=True)
    with pytest.raises(ts.blocks.UnsupportedModuleError, match="Mine"):
        ts.Chain.from_sequential(nn.Sequential(nn.Linear(2, 2), Mine()), nn.MSELoss(), strict=True)
    ts.Chain([nn.Linear(2, 2), Mine()], nn.MSELoss())  # falls back without strict


def test_from_sequential_needs_a_sequential():
    with pytest.raises(TypeError, match="nn.Sequential"):
        ts.Chain.from_sequential([nn.Linear(2, 2)], nn.MSELoss())


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (-1.0, ValueError, ">= 0"),
        (float("nan"), ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        ("0.1", TypeError, "real number"),
        (True, TypeError, "real number"),
        (None, TypeError, "real number"),
    ],
)
def test_bad_damping(setup, bad, error, match):
    chain, _, _, X, y = setup
    P = sum(p.numel() for p in chain.parameters())
    b = torch.randn(P)
    with pytest.raises(error, match=match):
        chain.inverse_hvp(X, y, b, damping=bad)
    curv = chain.curvature(X, y)
    with pytest.raises(error, match=match):
        curv.factorize(bad)
    with pytest.raises(error, match=match):
        curv.solve(b, bad)


def test_bad_kind(setup):
    chain, _, _, X, y = setup
    with pytest.raises(ValueError, match="kind must be one of"):
        chain.curvature(X, y, kind="fisher")


def test_bad_vectors(setup):
    chain, _, _, X, y = setup
    params = list(chain.parameters())
    P = sum(p.numel() for p in params)
    curv = chain.curvature(X, y)
    with pytest.raises(ValueError, match=rf"\({P},\) or \({P}, k\)"):
        curv.hvp(torch.randn(P + 1))
    with pytest.raises(ValueError, match=rf"\({P},\) or \({P}, k\)"):
        curv.hvp(torch.randn(P, 2, 2))
    with pytest.raises(TypeError, match="float32"):
        curv.hvp(torch.randn(P, dtype=torch.float32))
    with pytest.raises(ValueError, match="list of 1 tensors"):
        curv.hvp([torch.randn(P)])
    wrong = [torch.randn(p.shape) for p in params]
    wrong[2] = torch.randn(3, 3, 3)
    with pytest.raises(ValueError, match=r"\[2\] \(parameter '2.weight'\)"):
        curv.solve(wrong, 0.1)
    with pytest.raises(TypeError, match="tensor or a list"):
        curv.hvp("abc")
    with pytest.raises(ValueError, match=rf"\({P},\)"):
        chain.inverse_hvp(X, y, torch.randn(P - 1), damping=0.1)


def test_bad_targets_and_shapes(setup):
    chain, modules, loss, X, y = setup
    with pytest.raises((TypeError, ValueError), match="target"):
        chain.curvature(X, y.to(torch.float64))  # CE with class indices needs integers
    with pytest.raises((TypeError, ValueError)):
        chain.curvature(X, torch.full_like(y, 99))  # class index out of range
    with pytest.raises(ValueError, match="block 0"):
        chain.curvature(torch.randn(X.shape[0], X.shape[1] + 1), y)  # width does not fit
    with pytest.raises(TypeError, match="dtype"):
        chain.curvature(X.to(torch.float32), y)
    mismatched = ts.Chain([nn.Linear(3, 4).double(), nn.Linear(5, 2).double()], nn.MSELoss())
    with pytest.raises(ValueError, match=r"block 1 \(Linear\)"):
        mismatched.curvature(torch.randn(2, 3), torch.randn(2, 2))


def test_non_scalar_loss():
    chain = ts.Chain([nn.Linear(3, 2).double()], lambda z, t: (z - t) ** 2)
    with pytest.raises((TypeError, ValueError), match="scalar"):
        chain.curvature(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError):
        ts.Chain([nn.Linear(3, 2).double()], nn.MSELoss(reduction="none"))


def test_singular_system_says_so():
    """Batch 1, two classes: the Gauss–Newton matrix has rank 1, so GGN + 0·I is singular."""
    torch.manual_seed(0)
    chain = ts.Chain([nn.Linear(3, 4).double(), nn.Tanh(), nn.Linear(4, 2).double()], nn.CrossEntropyLoss())
    X, y = torch.randn(1, 3), torch.tensor([1])
    curv = chain.curvature(X, y, kind="ggn")
    with pytest.raises(ts.SingularSystemError) as info:
        curv.factorize(0.0)
    assert info.value.damping == 0.0 and "damping=0" in str(info.value)
    assert isinstance(info.value, torch.linalg.LinAlgError) and isinstance(info.value, ValueError)
    P = curv.num_parameters
    with pytest.raises(ts.SingularSystemError):
        chain.inverse_hvp(X, y, torch.randn(P), damping=0.0, kind="ggn")
    fact = curv.factorize(1e-3)  # damped, it is fine
    assert fact.inertia() == (P, 0, 0) and fact.is_positive_definite()


def test_shared_parameters_are_rejected():
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="shared"):
        ts.Chain([lin, nn.Tanh(), lin], nn.MSELoss())


def _snapshot(modules):
    return [
        (
            m.training,
            [(p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone()) for p in m.parameters()],
            [b.clone() for b in m.buffers()],
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._backward_hooks),
        )
        for m in modules
    ]


def _assert_same(before, after):
    for (t0, p0, b0, h0, ph0, bh0), (t1, p1, b1, h1, ph1, bh1) in zip(before, after):
        assert t0 == t1 and h0 == h1 and ph0 == ph1 and bh0 == bh1
        for (v0, r0, g0), (v1, r1, g1) in zip(p0, p1):
            assert torch.equal(v0, v1) and r0 == r1
            assert (g0 is None and g1 is None) or torch.equal(g0, g1)
        for x0, x1 in zip(b0, b1):
            assert torch.equal(x0, x1)


def test_model_is_unchanged_by_every_call():
    torch.manual_seed(0)
    modules = [nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.0), nn.Linear(5, 3)]
    modules = [m.double() for m in modules]
    modules[1].train()
    modules[3].eval()
    modules[0].weight.grad = torch.ones_like(modules[0].weight)
    modules[4].bias.requires_grad_(False)
    calls = []
    modules[2].register_forward_hook(lambda *a: calls.append(1))
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    X, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    before = _snapshot(modules)
    P = sum(p.numel() for p in chain.parameters())
    curv = chain.curvature(X, y)
    curv.hvp(torch.randn(P))
    curv.solve(torch.randn(P), 0.1)
    fact = curv.factorize(0.5)
    fact.logdet(), fact.inertia()
    chain.hvp(X, y, torch.randn(P), kind="ggn")
    chain.inverse_hvp(X, y, torch.randn(P), damping=1.0)
    curv.to_dense()
    _assert_same(before, _snapshot(modules))
    # a frozen parameter is not part of θ
    assert all(p.requires_grad for p in chain.parameters())
    assert P == sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("where", ["input", "hidden"])
def test_non_finite_activations_are_named(where):
    """One reduction checks the whole pass; the error names the block that saw NaN/inf."""
    lin1, lin2 = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    chain = ts.Chain([lin1, nn.Tanh(), lin2], nn.MSELoss())
    X = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(2, 2, dtype=torch.float64)
    if where == "input":
        X[1, 0] = math.nan
        block = "block 0 (Linear)"
    else:
        with torch.no_grad():
            lin1.weight[0, 0] = math.inf
        block = "block 1 (Tanh)"
    with pytest.raises(ValueError, match=r"NaN or inf") as info:
        chain.curvature(X, y)
    assert block in str(info.value)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_callable_loss_with_a_non_finite_hessian_is_named(kind):
    """|z − t|^1.5 has an infinite second derivative where z = t (a ReLU's zeros meet
    zero targets): the curvature refuses, naming the loss, instead of giving NaN products."""
    chain = ts.Chain([nn.Linear(4, 4).double(), nn.ReLU()], lambda z, t: ((z - t).abs() ** 1.5).mean())
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.zeros(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"FuncLoss.*the Hessian of the loss contains NaN or inf"):
        chain.curvature(X, y, kind=kind)


def test_a_fallback_block_with_a_non_finite_hessian_is_named():
    """|x|^1.5 after a ReLU (x = 0 at the dead units): torch.func's second derivatives of the
    fallback block are infinite there. The Hessian refuses, naming the block (its
    derivatives are checked even where the chain vouches for its inputs); the
    Gauss–Newton matrix needs no second derivatives of the block, and is finite."""

    class Power(nn.Module):
        def forward(self, x):
            return x.abs() ** 1.5

    torch.manual_seed(0)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.zeros(8, 2, dtype=torch.float64)
    chain = ts.Chain([nn.Linear(4, 4).double(), nn.ReLU(), Power(), nn.Linear(4, 2).double()], nn.MSELoss())
    with pytest.raises(ValueError, match=r"FuncBlock\(Power\).*NaN or inf"):
        chain.curvature(X, y, kind="hessian")
    curv = chain.curvature(X, y, kind="ggn")
    assert bool(torch.isfinite(curv.hvp(torch.ones(curv.num_parameters, dtype=torch.float64))).all())


def test_blocks_check_outside_the_chain():
    """Called directly (not from a chain), a block still checks its inputs for NaN/inf."""
    block = ts.blocks.block_for(nn.Linear(3, 2).double())
    z = torch.full((1, 3), math.nan, dtype=torch.float64)
    params = [p.detach() for p in block.parameters()]
    with pytest.raises(ValueError, match="NaN or inf"):
        block.oracle(z, params, torch.zeros(1, 2, dtype=torch.float64))


def test_garbage_collector_is_paused_only_during_a_call(setup):
    """The cyclic collector is off while a call runs, and as it was afterwards: back on
    after a normal return and after an error, left off if the caller had turned it off."""
    import gc

    _, modules, loss, X, y = setup
    seen = []

    def recording_loss(z, target):
        seen.append(gc.isenabled())
        return loss(z, target)

    chain = ts.Chain(modules, recording_loss)
    P = sum(p.numel() for p in chain.parameters())
    was = gc.isenabled()
    try:
        gc.enable()
        chain.inverse_hvp(X, y, torch.randn(P, dtype=torch.float64), damping=0.1)
        assert gc.isenabled() and seen and not any(seen)
        with pytest.raises(ValueError):
            chain.inverse_hvp(X, y, torch.randn(P + 1, dtype=torch.float64), damping=0.1)
        with pytest.raises(ValueError):
            chain.curvature(X, y).solve(torch.randn(P, dtype=torch.float64), damping=-1.0)
        assert gc.isenabled()
        gc.disable()
        chain.curvature(X, y).factorize(0.1).logdet()
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
