"""The shared test-suite must fail on broken blocks (a check that cannot fail is a defect)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tallskinny.blocks import Oracle, block_for, loss_for
from tallskinny.blocks.protocol import DeferredOracle
from tallskinny.blocks.elementwise import TanhBlock
from tallskinny.blocks.linear import LinearBlock
from tallskinny.blocks.losses import MSELossBlock
from tallskinny.blocks.testing import assert_module_unchanged, check_block, check_loss, default_tolerances
from tallskinny.linalg import Dense, Diagonal, Zero

f64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


class WrongCurvature(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        return Oracle(G=o.G, F=o.F, A=o.A, C=o.C, E=-1.0 * o.E if second_order else o.E)


class SloppyRelative(TanhBlock):
    """Off by one part in 1e9: passes a loose tolerance, fails the default 1e-12."""

    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        return Oracle(G=o.G, F=Diagonal(o.F.diagonal * (1 + 1e-9)), A=o.A, C=o.C, E=o.E)


class WrongShape(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        n = z.numel()
        return Oracle(G=o.G, F=o.F, A=o.A, C=o.C, E=Zero(n, n + 1, dtype=z.dtype))


class WrongForward(TanhBlock):
    def forward(self, z, params):
        return torch.tanh(z) + 1e-6


class DetachedForward(LinearBlock):
    """Forward that is right in value but not differentiable w.r.t. θ as the oracle claims."""

    def forward(self, z, params):
        return super().forward(z, [p.detach() for p in params])


class TouchesModule(TanhBlock):
    def forward(self, z, params):
        self.module.eval()
        return super().forward(z, params)


class MutatesInput(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        g.mul_(1.0)
        z.add_(0.0)
        g[..., 0] = 0.0
        return o


class NonzeroFirstOrder(TanhBlock):
    """second_order=False must give zeros or the exact values, not something else."""

    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=True)
        if second_order:
            return o
        return Oracle(G=o.G, F=o.F, A=o.A, C=o.C, E=Diagonal(torch.ones(z.numel(), dtype=z.dtype)))


class LyingOperator(Dense):
    """to_dense() and @ disagree."""

    def _matmat(self, x):
        return 2 * (self.matrix @ x)


class InconsistentProducts(LinearBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        return Oracle(G=LyingOperator(o.G.to_dense()), F=o.F, A=o.A, C=o.C, E=o.E)


@pytest.mark.parametrize(
    "block_cls, make, message",
    [
        (WrongCurvature, nn.Tanh, r"oracle\(second_order=True\)\.E"),
        (SloppyRelative, nn.Tanh, r"\.F: max \|difference\|"),
        (WrongShape, nn.Tanh, r"\.E has shape"),
        (WrongForward, nn.Tanh, "forward vs calling the module"),
        (DetachedForward, lambda: nn.Linear(3, 3).double(), "w.r.t. θ vs Gᵀg"),
        (TouchesModule, nn.Tanh, "the module changed: <root>: training"),
        (MutatesInput, nn.Tanh, "modified its input g in place"),
        (NonzeroFirstOrder, nn.Tanh, "neither zero nor the exact value"),
        (InconsistentProducts, lambda: nn.Linear(3, 3).double(), r"\.G @ x vs to_dense\(\) @ x"),
    ],
)
def test_check_block_catches(block_cls, make, message):
    with pytest.raises(AssertionError, match=message):
        check_block(block_cls(make()), randn(2, 3))


def test_loose_tolerance_is_honoured():
    check_block(SloppyRelative(nn.Tanh()), randn(2, 3), atol=1e-8, rtol=1e-8)


def test_check_block_accepts_blocks_and_modules_and_returns_the_oracle():
    module = nn.Linear(3, 2).double()
    o1 = check_block(module, randn(4, 3))
    o2 = check_block(LinearBlock(module), randn(4, 3))
    assert isinstance(o1, Oracle) and torch.equal(o1.G.to_dense(), o2.G.to_dense())
    with pytest.raises(TypeError, match="nn.Module or a block with a .module"):
        check_block(object(), randn(2))


class WrongMSE(MSELossBlock):
    def oracle(self, z, target):
        o = super().oracle(z, target)
        return Oracle(G=o.G, F=o.F, A=o.A, C=o.C, E=2.0 * o.E)


class WrongMSEGradient(MSELossBlock):
    def oracle(self, z, target):
        o = super().oracle(z, target)
        return Oracle(G=o.G, F=-1.0 * o.F, A=o.A, C=o.C, E=o.E)


def test_check_loss_catches():
    z, y = randn(3, 2), randn(3, 2, seed=1)
    with pytest.raises(AssertionError, match=r"oracle\.E"):
        check_loss(WrongMSE(nn.MSELoss()), z, y)
    with pytest.raises(AssertionError, match=r"oracle\.F"):
        check_loss(WrongMSEGradient(nn.MSELoss()), z, y)
    check_loss(MSELossBlock(nn.MSELoss()), z, y)
    check_loss(loss_for(nn.MSELoss()), z, y)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.weight.data.add_(1.0), "parameter weight: value"),
        (lambda m: m.weight.requires_grad_(False), "parameter weight: requires_grad"),
        (lambda m: setattr(m.weight, "grad", torch.zeros_like(m.weight)), "parameter weight: grad"),
        (lambda m: m.eval(), "training"),
        (lambda m: m.register_forward_hook(lambda *a: None), "_forward_hooks"),
        (lambda m: m.register_forward_pre_hook(lambda *a: None), "_forward_pre_hooks"),
        (lambda m: m.register_buffer("extra", torch.zeros(1)), "buffer extra"),
        (lambda m: setattr(m, "weight", nn.Parameter(m.weight.detach().clone())), "parameter weight: identity"),
    ],
)
def test_assert_module_unchanged_detects(change, message):
    module = nn.Linear(2, 2)
    with pytest.raises(AssertionError, match=message):
        with assert_module_unchanged(module):
            change(module)


def test_assert_module_unchanged_passes_on_a_real_call():
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double()
    block = block_for(module)
    with assert_module_unchanged(module):
        block.forward(randn(3, 2), [p.detach() for p in block.parameters()])
    with pytest.raises(AssertionError, match="buffer 1.running_mean"):
        with assert_module_unchanged(module):
            module(randn(3, 2))  # calling a BatchNorm in training mode updates its statistics


def test_default_tolerances():
    assert default_tolerances(torch.float64) == (1e-12, 1e-12)
    assert default_tolerances(torch.float32) == (1e-5, 1e-5)


# -- deferred oracles: their hints must describe what they build ------------------------------
class WrongLinearHint(LinearBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        W, x, gg = o.linear
        return DeferredOracle(o.__dict__["_build"], o.sizes, linear=(W, 2 * x, gg))


class WrongGradientHint(LinearBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        W, x, gg = o.linear
        return DeferredOracle(o.__dict__["_build"], o.sizes, linear=(W, x, None if gg is None else gg + 1))


class WrongDiagonalHint(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        d, e = o.diagonal
        return DeferredOracle(o.__dict__["_build"], o.sizes, diagonal=(d, None if e is None else -e))


class WrongSizes(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        a = o.sizes[0]
        return DeferredOracle(o.__dict__["_build"], (a, a + 1, 0), diagonal=o.diagonal)


class BuiltTooEarly(TanhBlock):
    def oracle(self, z, params, g, *, second_order=True):
        o = super().oracle(z, params, g, second_order=second_order)
        o.F  # noqa: B018 (builds the operators)
        return o


@pytest.mark.parametrize(
    "block_cls, make, message",
    [
        (WrongLinearHint, lambda: nn.Linear(3, 2).double(), "linear hint x vs G"),
        (WrongGradientHint, lambda: nn.Linear(3, 2).double(), "linear hint g vs C"),
        (WrongDiagonalHint, nn.Tanh, "diagonal hint e vs E"),
        (WrongSizes, nn.Tanh, r"DeferredOracle\.sizes"),
        (BuiltTooEarly, nn.Tanh, "built before"),
    ],
)
def test_check_block_catches_wrong_deferred_hints(block_cls, make, message):
    with pytest.raises(AssertionError, match=message):
        check_block(block_cls(make()), randn(1, 3))


def test_deferred_oracles_build_once_on_first_access():
    block = block_for(nn.Linear(3, 2).double())
    z, g = randn(1, 3), randn(1, 2, seed=1)
    o = block.oracle(z, list(block.parameters()), g)
    assert isinstance(o, DeferredOracle) and not o.built
    W, x, gg = o.linear
    assert W is block.module.weight.detach() or torch.equal(W, block.module.weight.detach())
    assert torch.equal(x.reshape(-1), z.reshape(-1)) and torch.equal(gg.reshape(-1), g.reshape(-1))
    F = o.F
    assert o.built and o.F is F and torch.equal(F.to_dense(), W)
    with pytest.raises(AttributeError):
        o.no_such_field  # noqa: B018
    # two samples: the operators at once (no hint)
    eager = block.oracle(randn(2, 3), list(block.parameters()), randn(2, 2))
    assert not isinstance(eager, DeferredOracle)
