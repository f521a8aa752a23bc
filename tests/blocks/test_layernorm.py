"""The analytic LayerNorm block against the torch.func fallback, plain autograd on a
hand-written layer norm, and dense Hessians of chains that use it.

``torch.func.hessian`` is silently wrong for layer norm in torch 2.13, so every dense
reference here is reverse-over-reverse (``torch.autograd.functional.hessian`` or
``jacrev(grad)``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call, grad, jacrev

import tallskinny as ts
from tallskinny.blocks import block_for
from tallskinny.blocks.norm import LayerNormBlock
from tallskinny.blocks.testing import assert_module_unchanged, check_block
from tallskinny.linalg import Zero

f64 = torch.float64


def randn(*shape, seed=0, dtype=f64, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def layer_norm(module: nn.LayerNorm, dtype=f64, seed=0) -> nn.LayerNorm:
    """``module`` in ``dtype`` with random (not 1/0) affine parameters."""
    module = module.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return module


def hand_layer_norm(x, weight, bias, normalized_shape, eps):
    """Layer norm written out with elementary operations."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    c = x - mu
    var = (c * c).mean(dim=dims, keepdim=True)
    y = c / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


CONFIGS = {
    "vector": (lambda: nn.LayerNorm(5), (3, 5)),
    "matrix_shape": (lambda: nn.LayerNorm((2, 3), eps=1e-3), (2, 4, 2, 3)),
    "no_affine": (lambda: nn.LayerNorm(4, elementwise_affine=False), (2, 4)),
    "no_bias": (lambda: nn.LayerNorm(4, bias=False), (1, 4)),
    "unbatched": (lambda: nn.LayerNorm(6), (6,)),
    "one_feature_pair": (lambda: nn.LayerNorm(2), (3, 2)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_layernorm_block_matches_fallback(name):
    make, shape = CONFIGS[name]
    module = layer_norm(make(), seed=1)
    assert type(block_for(module)) is LayerNormBlock
    oracle = check_block(module, randn(*shape, seed=2))
    assert isinstance(oracle.A, Zero)


def test_layernorm_frozen_parameters():
    module = layer_norm(nn.LayerNorm(4), seed=3)
    module.weight.requires_grad_(False)
    oracle = check_block(module, randn(3, 4, seed=4))
    assert oracle.G.shape == (12, 4) and isinstance(oracle.C, Zero)  # only β: C = 0
    module = layer_norm(nn.LayerNorm(4), seed=3)
    module.bias.requires_grad_(False)
    oracle = check_block(module, randn(3, 4, seed=4))
    assert oracle.G.shape == (12, 4) and not bool((oracle.C.to_dense() == 0).all())


def test_layernorm_float32():
    module = layer_norm(nn.LayerNorm(5), dtype=torch.float32, seed=5)
    check_block(module, randn(3, 5, seed=6, dtype=torch.float32))


@pytest.mark.parametrize("shape,normalized", [((3, 4), (4,)), ((2, 2, 3), (2, 3))])
def test_layernorm_against_plain_autograd(shape, normalized):
    """Every field against plain autograd (double backward) of a hand-written layer norm."""
    module = layer_norm(nn.LayerNorm(normalized, eps=1e-2), seed=7)
    z, g = randn(*shape, seed=8), randn(*shape, seed=9)
    params = [p.detach() for p in module.parameters()]
    oracle = block_for(module).oracle(z, params, g)
    sizes = [p.numel() for p in params]
    P = sum(sizes)

    def flat(x):
        w, b = [t.reshape(normalized) for t in x[:P].split(sizes)]
        return hand_layer_norm(x[P:].reshape(shape), w, b, normalized, module.eps).reshape(-1)

    x0 = torch.cat([*(p.reshape(-1) for p in params), z.reshape(-1)])
    J = jacobian(flat, x0)
    H = hessian(lambda x: (g.reshape(-1) * flat(x)).sum(), x0)
    expected = dict(G=J[:, :P], F=J[:, P:], A=H[:P, :P], C=H[:P, P:], E=H[P:, P:])
    for field, value in expected.items():
        torch.testing.assert_close(getattr(oracle, field).to_dense(), value, rtol=1e-12, atol=1e-12, msg=field)
    # the curvature in the input is not trivial (a test that cannot fail is a defect)
    assert float(expected["E"].abs().max()) > 1e-2 and float(expected["C"].abs().max()) > 1e-2


def test_layernorm_input_errors():
    module = layer_norm(nn.LayerNorm((2, 3)), seed=1)
    block = block_for(module)
    params = [p.detach() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"\(\*, 2, 3\)"):
        block.forward(randn(4, 3, 2), params)
    with pytest.raises(ValueError, match="expected 2 parameter tensors"):
        block.oracle(randn(4, 2, 3), params[:1], randn(4, 2, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        block.oracle(torch.full((4, 2, 3), float("nan"), dtype=f64), params, randn(4, 2, 3))
    with pytest.raises(ValueError, match="shape of the output"):
        block.oracle(randn(4, 2, 3), params, randn(4, 6))
    with pytest.raises(TypeError, match="dtype"):
        block.oracle(randn(4, 2, 3), params, randn(4, 2, 3, dtype=torch.float32))


def test_layernorm_leaves_module_unchanged():
    module = layer_norm(nn.LayerNorm(4), seed=2)
    module.weight.grad = torch.ones(4, dtype=f64)
    with assert_module_unchanged(module):
        block_for(module).oracle(randn(2, 4), [p.detach() for p in module.parameters()], randn(2, 4, seed=1))


# -- chains -------------------------------------------------------------------------------
def _dense_hessian(chain, X, y):
    """The Hessian of the chain's loss in θ by ``jacrev(grad)`` with a hand-written layer norm."""
    params = list(chain.parameters())
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(theta):
        pieces = iter(t.reshape(s) for t, s in zip(theta.split(sizes), shapes))
        z = X
        for m in chain.modules:
            if isinstance(m, nn.LayerNorm):
                z = hand_layer_norm(z, next(pieces), next(pieces), m.normalized_shape, m.eps)
            else:
                names = [n for n, p in m.named_parameters()]
                z = functional_call(m, {n: next(pieces) for n in names}, (z,))
        return chain.loss(z, y)

    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    H = jacrev(grad(loss))(theta0)
    return 0.5 * (H + H.mT)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_chain_with_layernorm_matches_dense(batch):
    torch.manual_seed(batch)
    modules = [nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 4)]
    modules = [m.double() for m in modules]
    for m in modules:
        if isinstance(m, nn.LayerNorm):
            layer_norm(m, seed=batch)
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    assert any(isinstance(b, LayerNormBlock) for b in chain.blocks)
    X, y = randn(batch, 3, seed=20 + batch), torch.arange(batch) % 4
    H = _dense_hessian(chain, X, y)
    P = H.shape[0]
    curv = chain.curvature(X, y)
    V = randn(P, 3, seed=30)
    assert _rel(curv.hvp(V), H @ V) <= 1e-11
    negative_seen = False
    for damping in (1e-3, 0.1, 3.0):
        M = H + damping * torch.eye(P, dtype=f64)
        eig = torch.linalg.eigvalsh(M)
        cond = (eig.abs().max() / eig.abs().min()).item()
        fact = curv.factorize(damping)
        assert _rel(fact.solve(V), torch.linalg.solve(M, V)) <= max(1e-9, 10 * 2.2e-16 * cond)
        assert tuple(fact.inertia()) == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
        logdet = eig.abs().log().sum().item()
        assert math.isclose(fact.logdet().item(), logdet, rel_tol=1e-9, abs_tol=1e-13 * P * cond)
        negative_seen |= bool((eig < 0).any())
    assert negative_seen  # an indefinite case is among them
