"""Each analytic block equals its own torch.func fallback (float64, 1e-12), and keeps its structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tallskinny.blocks import FuncBlock, block_for
from tallskinny.blocks.elementwise import (
    GELUBlock,
    IdentityBlock,
    ReLUBlock,
    SigmoidBlock,
    SiLUBlock,
    SoftplusBlock,
    TanhBlock,
)
from tallskinny.blocks.linear import LinearBlock
from tallskinny.blocks.shape import FlattenBlock, UnflattenBlock
from tallskinny.blocks.testing import check_block
from tallskinny.linalg.kronecker import Kronecker
from tallskinny.linalg import Dense, Diagonal, ScaledIdentity, Zero

f64 = torch.float64


def randn(*shape, seed=0, dtype=f64, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def linear(i, o, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).double()


# -- Linear -----------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("features", [(3, 4), (1, 2), (4, 1)])
def test_linear_matches_fallback(features, batch, bias):
    module = linear(*features, bias=bias, seed=batch)
    assert isinstance(block_for(module), LinearBlock)
    check_block(module, randn(batch, features[0], seed=batch), g=None, seed=batch)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 3), (2, 1, 2, 3)])
def test_linear_any_leading_sample_dims(shape):
    check_block(linear(3, 2), randn(*shape, seed=len(shape)))


@pytest.mark.parametrize("frozen", ["weight", "bias", "both"])
def test_linear_frozen_parameters_are_not_in_theta(frozen):
    module = linear(3, 2)
    for name in ("weight", "bias") if frozen == "both" else (frozen,):
        getattr(module, name).requires_grad_(False)
    oracle = check_block(module, randn(4, 3, seed=1))
    expected_p = {"weight": 2, "bias": 6, "both": 0}[frozen]
    assert oracle.G.shape == (8, expected_p)


def test_linear_oracle_formulas_and_structure():
    """G, F, C as stated in the module docstring, written out entry by entry."""
    module = linear(3, 2)
    z, g = randn(4, 3, seed=2), randn(4, 2, seed=3)
    W = module.weight.detach()
    o = block_for(module).oracle(z, [p.detach() for p in module.parameters()], g)
    G, F, C = o.G.to_dense(), o.F.to_dense(), o.C.to_dense()
    for s in range(4):
        for k in range(2):
            row = s * 2 + k
            for kk in range(2):
                for j in range(3):
                    assert G[row, kk * 3 + j] == (z[s, j] if kk == k else 0.0)
                assert G[row, 6 + kk] == (1.0 if kk == k else 0.0)
            for ss in range(4):
                assert torch.equal(F[row, ss * 3 : ss * 3 + 3], W[k] if ss == s else torch.zeros(3, dtype=f64))
    for k in range(2):
        for j in range(3):
            for s in range(4):
                for jj in range(3):
                    assert C[k * 3 + j, s * 3 + jj] == (g[s, k] if jj == j else 0.0)
    assert torch.equal(C[6:], torch.zeros(2, 12, dtype=f64))
    assert isinstance(o.A, Zero) and isinstance(o.E, Zero)
    first = block_for(module).oracle(z, [p.detach() for p in module.parameters()], g, second_order=False)
    assert isinstance(first.C, Zero) and isinstance(first.A, Zero) and isinstance(first.E, Zero)
    assert torch.equal(first.G.to_dense(), G) and torch.equal(first.F.to_dense(), F)


def test_linear_bad_input_shape():
    block = block_for(linear(3, 2))
    params = [p.detach() for p in block.parameters()]
    with pytest.raises(ValueError, match=r"shape \(\*, 3\)"):
        block.forward(randn(4, 2), params)
    with pytest.raises(ValueError, match="g .* must have the shape of the output"):
        block.oracle(randn(4, 3), params, randn(4, 3))


# -- elementwise ------------------------------------------------------------------------
ACTIVATIONS = {
    "tanh": (nn.Tanh, TanhBlock),
    "relu": (nn.ReLU, ReLUBlock),
    "relu_inplace": (lambda: nn.ReLU(inplace=True), ReLUBlock),
    "sigmoid": (nn.Sigmoid, SigmoidBlock),
    "softplus": (nn.Softplus, SoftplusBlock),
    "silu": (nn.SiLU, SiLUBlock),
    "gelu": (nn.GELU, GELUBlock),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), GELUBlock),
    "identity": (nn.Identity, IdentityBlock),
}


@pytest.mark.parametrize("shape", [(1, 3), (2, 5), (3, 4), (5, 2), (2, 3, 2), (7,)])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_fallback(name, shape):
    make, cls = ACTIVATIONS[name]
    module = make()
    assert isinstance(block_for(module), cls)
    z = randn(*shape, seed=len(shape) + shape[0], scale=2.0)
    check_block(module, z, seed=shape[0])


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_structure(name):
    make, _ = ACTIVATIONS[name]
    block = block_for(make())
    z, g = randn(3, 4, seed=5), randn(3, 4, seed=6)
    o = block.oracle(z, [], g)
    assert isinstance(o.F, (Diagonal, ScaledIdentity))
    assert isinstance(o.E, Zero if name in ("relu", "relu_inplace", "identity") else Diagonal)
    assert o.G.shape == (12, 0) and o.A.shape == (0, 0) and o.C.shape == (0, 12)
    assert isinstance(block.oracle(z, [], g, second_order=False).E, Zero)


def test_relu_kink_follows_pytorch():
    """σ'(0) = 0, as autograd has it; E = 0."""
    z = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 3.0, -0.0]], dtype=f64)
    o = check_block(nn.ReLU(), z)
    assert torch.equal(o.F.to_dense().diagonal(), torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=f64))


def test_inplace_relu_does_not_touch_its_input():
    z = randn(2, 3, seed=7)
    before = z.clone()
    out = block_for(nn.ReLU(inplace=True)).forward(z, [])
    assert torch.equal(z, before) and torch.equal(out, torch.relu(before))


@pytest.mark.parametrize(
    "beta, threshold",
    [(1.0, 20.0), (2.0, 1.0), (0.5, 0.3), (3, 2)],
)
def test_softplus_across_the_threshold(beta, threshold):
    edge = threshold / beta  # βz = threshold exactly: PyTorch still uses the smooth formula
    z = torch.tensor([[-3.0, -0.5, 0.0, 0.5 * edge], [edge, 1.5 * edge, 3 * edge + 1, 25.0]], dtype=f64)
    o = check_block(nn.Softplus(beta=beta, threshold=threshold), z)
    d1 = o.F.to_dense().diagonal()
    linear_part = z.reshape(-1) * beta > threshold
    assert torch.equal(d1[linear_part], torch.ones(int(linear_part.sum()), dtype=f64))
    assert bool((d1[~linear_part] < 1).all())


def test_gelu_approximations_differ():
    """The two GELU rules are distinct functions; each matches its own fallback."""
    z = randn(3, 4, seed=8, scale=2.0)
    exact = check_block(nn.GELU(), z)
    approx = check_block(nn.GELU(approximate="tanh"), z)
    assert (exact.F.to_dense() - approx.F.to_dense()).abs().max() > 1e-5


# -- shape --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    [
        nn.Flatten(),
        nn.Flatten(0, -1),
        nn.Flatten(1, 2),
        nn.Flatten(2, 3),
        nn.Flatten(0, 1),
        nn.Flatten(1, 1),
        nn.Flatten(-2, -1),
        nn.Unflatten(1, (3, 1)),
        nn.Unflatten(-1, (2, 2)),
    ],
    ids=repr,
)
def test_reshapes_match_fallback(module):
    z = randn(2, 3, 1, 4, seed=9)
    block = block_for(module)
    assert isinstance(block, (FlattenBlock, UnflattenBlock))
    o = check_block(module, z)
    assert isinstance(o.F, ScaledIdentity) and o.F.scale == 1.0 and isinstance(o.E, Zero)
    out = block.forward(z, [])
    assert out is not z and torch.equal(out, module(z))


def test_flatten_bad_dims_raise_before_work():
    block = block_for(nn.Flatten(2, 3))
    with pytest.raises(IndexError):
        block.oracle(randn(2, 3), [], randn(2, 3))


# -- float32 ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [lambda: nn.Linear(3, 4), nn.Tanh, nn.GELU, lambda: nn.Softplus(beta=2.0, threshold=1.0), nn.Flatten],
    ids=["linear", "tanh", "gelu", "softplus", "flatten"],
)
def test_float32_sanity(make):
    torch.manual_seed(0)
    module = make().float()
    z = randn(3, 3, seed=10, dtype=torch.float32)
    o = check_block(module, z)  # float32 tolerances: 1e-5
    assert o.F.dtype == torch.float32 and o.G.dtype == torch.float32


# -- a registered block ignores nothing the module does -----------------------------------
def test_analytic_and_fallback_forward_agree_with_module_call():
    module = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    z = randn(2, 3, seed=11)
    lin, act = block_for(module[0]), block_for(module[1])
    out = act.forward(lin.forward(z, [p.detach() for p in lin.parameters()]), [])
    assert torch.allclose(out, module(z), rtol=1e-15, atol=1e-15)
    assert isinstance(block_for(module), FuncBlock)
    assert isinstance(lin.oracle(z, [p.detach() for p in lin.parameters()], randn(2, 3)).F, Kronecker)


@pytest.mark.parametrize("dtype, lo, rtol", [(torch.float64, -12.0, 1e-12), (torch.float32, -6.0, 1e-5)])
def test_gelu_tanh_derivatives_exact_where_tanh_saturates(dtype, lo, rtol):
    """Where ``tanh u`` rounds to ``∓1``, ``σ'`` (left) and ``σ''`` (both tails) are tiny but
    not 0: the rule keeps their relative accuracy (``1 − t·t`` would give 0; so does
    autograd for ``σ'``)."""
    mp = pytest.importorskip("mpmath")
    from tallskinny.blocks.elementwise import gelu_tanh_derivatives

    mp.mp.dps = 400
    c, kappa = mp.sqrt(2 / mp.pi), mp.mpf(0.044715)

    def exact(x):
        x = mp.mpf(x)
        u = c * (x + kappa * x**3)
        t, sech2 = mp.tanh(u), mp.sech(u) ** 2
        du, ddu = c * (1 + 3 * kappa * x * x), c * 6 * kappa * x
        return 0.5 * (1 + t) + 0.5 * x * sech2 * du, sech2 * (du - x * t * du * du + 0.5 * x * ddu)

    z = torch.cat([torch.linspace(lo, -2.0, 41, dtype=dtype), torch.linspace(2.0, -lo, 41, dtype=dtype)])
    d1, d2 = gelu_tanh_derivatives(z)
    for got, k in ((d1, 0), (d2, 1)):
        ref = torch.tensor([float(exact(float(v))[k]) for v in z], dtype=torch.float64)
        assert bool((ref != 0).all())
        assert float(((got.double() - ref).abs() / ref.abs()).max()) <= rtol


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "silu", "gelu", "softplus"])
def test_smooth_activation_derivatives_exact_in_both_tails(name):
    """``σ'`` and ``σ''`` of every smooth rule to 1e-12 relative against mpmath on
    ``[−30, 30]`` (softplus: its smooth part, ``z < 20``): saturated units keep their
    digits (``1 − t·t``, ``s(1 − s)`` and ``(1 + erf)/2`` lost them: autograd's formulas,
    so the dense references of the fuzzer lose them too)."""
    mp = pytest.importorskip("mpmath")
    from tallskinny.blocks import elementwise as rules

    mp.mp.dps = 250  # (σ'' of gelu at 30 is 1e-194 of σ: numerical differentiation needs the digits)
    functions = {
        "tanh": mp.tanh,
        "sigmoid": lambda x: 1 / (1 + mp.exp(-x)),
        "silu": lambda x: x / (1 + mp.exp(-x)),
        "gelu": lambda x: x * mp.erfc(-x / mp.sqrt(2)) / 2,
        "softplus": lambda x: mp.log1p(mp.exp(x)),
    }
    f = functions[name]
    hi = 19.5 if name == "softplus" else 30.0
    z = torch.cat([torch.linspace(-30.0, -0.5, 60, dtype=torch.float64), torch.linspace(0.5, hi, 60, dtype=torch.float64)])
    d1, d2 = getattr(rules, f"{name}_derivatives")(z)
    for got, order in ((d1, 1), (d2, 2)):
        ref = torch.tensor([float(mp.diff(f, mp.mpf(float(v)), order)) for v in z], dtype=torch.float64)
        nonzero = ref != 0
        err = ((got - ref).abs() / ref.abs())[nonzero]
        assert float(err.max()) <= 1e-12, (name, order, float(z[nonzero][err.argmax()]))
