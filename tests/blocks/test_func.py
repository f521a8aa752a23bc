"""The torch.func fallback (FuncBlock, FuncLoss) against independent dense computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

from tallskinny.blocks import Block, FuncBlock, FuncLoss, block_for, loss_for
from tallskinny.blocks.testing import assert_module_unchanged, check_block, check_loss
from tallskinny.linalg import Dense, Zero

f64 = torch.float64


def randn(*shape, seed=0, dtype=f64, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Mixing(nn.Module):
    """Samples interact: ``y = tanh(x ⊙ w) − mean over the batch + 0.1 (Σ (x w)²) · 1 + b``."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=f64))
        self.b = nn.Parameter(torch.linspace(-0.3, 0.2, d, dtype=f64))

    def forward(self, x):
        return mixing(x, self.w, self.b)


def mixing(x, w, b):
    y = torch.tanh(x * w)
    return y - y.mean(0, keepdim=True) + 0.1 * ((x * w) ** 2).sum() + b


def dense_reference(fn, z, params, g):
    """G, F, A, C, E of ``fn(z, *params)`` by plain autograd (no torch.func) on the plain function."""
    sizes = [p.numel() for p in params]
    p_total = sum(sizes)

    def flat(x):
        theta, zf = x[:p_total], x[p_total:]
        ps = [t.reshape(q.shape) for t, q in zip(theta.split(sizes), params)]
        return fn(zf.reshape(z.shape), *ps).reshape(-1)

    x0 = torch.cat([*(p.reshape(-1) for p in params), z.reshape(-1)])
    J = jacobian(flat, x0)
    H = hessian(lambda x: (g.reshape(-1) * flat(x)).sum(), x0)
    P = p_total
    return dict(G=J[:, :P], F=J[:, P:], A=H[:P, :P], C=H[:P, P:], E=H[P:, P:])


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_funcblock_with_interacting_samples(batch):
    module = Mixing(3)
    z, g = randn(batch, 3, seed=batch), randn(batch, 3, seed=10 + batch)
    block = block_for(module)
    assert type(block) is FuncBlock
    params = [p.detach().clone() for p in block.parameters()]
    with assert_module_unchanged(module):
        o = block.oracle(z, params, g)
    ref = dense_reference(mixing, z, params, g)
    for field, expected in ref.items():
        got = getattr(o, field).to_dense()
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), field
    # the samples really interact: F is not block-diagonal over samples
    if batch > 1:
        assert o.F.to_dense()[0:3, 3:6].abs().max() > 1e-3
    assert o.A.symmetric and o.E.symmetric
    first = block.oracle(z, params, g, second_order=False)
    assert all(isinstance(getattr(first, f), Zero) for f in "ACE")
    assert torch.equal(first.G.to_dense(), o.G.to_dense())


def normalize(x, w, b, dim, eps):
    """``(x − mean)/sqrt(var + eps) · w + b`` over ``dim``, written out (biased variance)."""
    centred = x - x.mean(dim, keepdim=True)
    return centred / torch.sqrt((centred**2).mean(dim, keepdim=True) + eps) * w + b


@pytest.mark.parametrize("batch", [2, 5])
def test_funcblock_batchnorm_train_mode(batch):
    """Samples interact through the batch statistics; the running statistics stay as they were.

    (``torch.func.hessian`` gets these second derivatives wrong in torch 2.13; the
    fallback's reverse-over-reverse must not.)"""
    module = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        module.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    z, g = randn(batch, 3, seed=1), randn(batch, 3, seed=2)
    o = check_block(module, z, g=g)  # includes: running_mean/var and num_batches_tracked unchanged
    ref = dense_reference(
        lambda x, w, b: normalize(x, w, b, 0, module.eps), z, [p.detach() for p in module.parameters()], g
    )
    for field, expected in ref.items():
        assert torch.allclose(getattr(o, field).to_dense(), expected, rtol=1e-12, atol=1e-12), field
    assert int(module.num_batches_tracked) == 0 and torch.equal(module.running_mean, torch.zeros(3, dtype=f64))


def test_funcblock_layernorm():
    module = nn.LayerNorm(4).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 1.5]))
        module.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    z, g = randn(3, 4, seed=3), randn(3, 4, seed=4)
    o = check_block(module, z, g=g)
    ref = dense_reference(
        lambda x, w, b: normalize(x, w, b, -1, module.eps), z, [p.detach() for p in module.parameters()], g
    )
    for field, expected in ref.items():
        assert torch.allclose(getattr(o, field).to_dense(), expected, rtol=1e-12, atol=1e-12), field


def test_funcblock_frozen_parameters_and_module_state():
    """Only parameters that require grad form θ; grads, flags, hooks, training untouched."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    module[0].bias.requires_grad_(False)
    module[2].weight.grad = torch.ones(2, 4, dtype=f64)
    module.eval()
    calls = []
    module[1].register_forward_hook(lambda m, i, o: calls.append(1))
    block = block_for(module)
    assert [n for n in block.parameter_names()] == ["0.weight", "2.weight", "2.bias"]
    assert all(p is q for p, q in zip(block.parameters(), [module[0].weight, module[2].weight, module[2].bias]))
    o = check_block(module, randn(3, 3, seed=3))
    assert o.G.shape == (6, 12 + 8 + 2)
    assert calls, "the module's own hooks run in forward, as when calling it"
    assert torch.equal(module[2].weight.grad, torch.ones(2, 4, dtype=f64)) and not module.training


def test_funcblock_inplace_module():
    module = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.1, inplace=True)).double()
    z = randn(4, 3, seed=4)
    before = z.clone()
    check_block(module, z)  # checks the inputs unchanged as well
    block_for(module).forward(z, [p.detach() for p in module.parameters()])
    assert torch.equal(z, before)


def test_block_subclass_without_oracle_is_the_fallback():
    class Plain(Block):
        pass

    module = Mixing(2)
    z, g = randn(3, 2, seed=5), randn(3, 2, seed=6)
    params = [p.detach() for p in module.parameters()]
    a, b = Plain(module).oracle(z, params, g), FuncBlock(module).oracle(z, params, g)
    for f in "GFACE":
        assert torch.equal(getattr(a, f).to_dense(), getattr(b, f).to_dense())
    assert isinstance(a.G, Dense)


def test_forward_is_differentiable_in_params_and_input():
    module = Mixing(2)
    block = block_for(module)
    z = randn(3, 2, seed=7).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in block.parameters()]
    out = block.forward(z, params)
    out.sum().backward()
    assert z.grad is not None and all(p.grad is not None for p in params)
    assert module.w.grad is None and module.b.grad is None


def test_block_validation_errors():
    module = Mixing(2)
    block = block_for(module)
    z, params = randn(3, 2), [p.detach() for p in module.parameters()]
    with pytest.raises(ValueError, match="expected 2 parameter tensors, got 1"):
        block.forward(z, params[:1])
    with pytest.raises(ValueError, match=r"parameter 1 must have shape \(2,\), got \(3,\)"):
        block.oracle(z, [params[0], torch.zeros(3, dtype=f64)], randn(3, 2))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        block.forward(z, [p.float() for p in params])
    with pytest.raises(TypeError, match="sequence"):
        block.forward(z, params[0])
    with pytest.raises(TypeError, match="floating-point"):
        block.forward(torch.ones(3, 2, dtype=torch.int64), params)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        block.oracle([[1.0, 2.0]], params, randn(3, 2))
    with pytest.raises(ValueError, match=r"g .* must have the shape of the output \(3, 2\), got \(2, 3\)"):
        block.oracle(z, params, randn(2, 3))
    with pytest.raises(TypeError, match="g has dtype torch.float32"):
        block.oracle(z, params, randn(3, 2, dtype=torch.float32))
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        block.oracle(bad, params, randn(3, 2))
    g_bad = randn(3, 2)
    g_bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="g contains NaN or inf"):
        block.oracle(z, params, g_bad)
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        FuncBlock(lambda x: x)


def test_module_returning_a_tuple_is_rejected():
    class Two(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="maps one tensor to one tensor"):
        block_for(Two()).forward(randn(2), [])


# -- FuncLoss -------------------------------------------------------------------------------
def quartic(z, t):
    return ((z - t) ** 4).sum() / 4 + (z * t).mean()


def test_funcloss_against_hand_derivatives():
    z, t = randn(3, 2, seed=8), randn(3, 2, seed=9)
    loss = FuncLoss(quartic)
    o = loss.oracle(z, t)
    grad = (z - t) ** 3 + t / z.numel()
    assert torch.allclose(o.F.to_dense(), grad.reshape(1, -1), rtol=1e-13, atol=1e-13)
    assert torch.allclose(o.E.to_dense(), torch.diag((3 * (z - t) ** 2).reshape(-1)), rtol=1e-13, atol=1e-13)
    assert o.G.shape == (1, 0) and o.A.shape == (0, 0) and o.C.shape == (0, 6)
    assert torch.equal(loss.forward(z, t), quartic(z, t))
    check_loss(quartic, z, t)


def test_funcloss_rejects_non_scalar_losses():
    loss = loss_for(nn.L1Loss(reduction="none"))  # unregistered: FuncLoss
    assert isinstance(loss, FuncLoss)
    z, t = randn(2, 2), randn(2, 2, seed=1)
    for call in (loss.check_target, loss.forward, loss.oracle):
        with pytest.raises(TypeError, match=r"must return a floating-point scalar .* shape \(2, 2\)"):
            call(z, t)
    with pytest.raises(TypeError, match="callable"):
        FuncLoss(3)


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_funcloss_bad_target_is_a_value_error():
    loss = FuncLoss(nn.L1Loss())
    with pytest.raises(ValueError, match="cannot take the target"):
        loss.check_target(randn(2, 3), randn(3, 2))


def test_funcloss_on_unregistered_loss_module():
    torch.manual_seed(0)
    check_loss(nn.HuberLoss(delta=0.5), randn(4, 3, seed=2), randn(4, 3, seed=3))
    check_loss(nn.BCEWithLogitsLoss(), randn(4, 3, seed=4), torch.rand(4, 3, dtype=f64))


class _Cube(torch.autograd.Function):
    """x³ with a reverse-mode rule only (no jvp)."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


class Expand(nn.Module):
    """``a_out = 3·a_in``: the fallback would take forward mode, which _Cube lacks."""

    def forward(self, x):
        return torch.cat([_Cube.apply(x), x, 2 * x], dim=-1)


def test_fallback_without_forward_mode_rules():
    z, g = randn(2, 2, seed=20), randn(2, 6, seed=21)
    o = check_block(Expand(), z, g=g)
    ref = dense_reference(lambda x: torch.cat([x**3, x, 2 * x], dim=-1), z, [], g)
    for field in "FE":
        assert torch.allclose(getattr(o, field).to_dense(), ref[field], rtol=1e-13, atol=1e-13), field
