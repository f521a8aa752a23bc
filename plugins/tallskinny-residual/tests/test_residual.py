"""The Residual block: its composed oracle against the torch.func fallback over the whole
unit, and chains of residual units against dense Hessians (float64, batches 1–4)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny.testing import check_chain, dense_hessian
from tallskinny.testing import relative_error as rel


def check_against_dense(chain, X, y, damping, *, gen, k=2, tol=1e-9):
    H = check_chain(chain, X, y, damping, generator=gen, k=k, rtol=tol)
    eig = torch.linalg.eigvalsh(H + damping * torch.eye(H.shape[0], dtype=H.dtype))
    return H, ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
from tallskinny.blocks import FuncBlock, block_for
from tallskinny.blocks.linear import LinearBlock
from tallskinny.blocks.testing import check_block
from tallskinny.linalg import Zero
from tallskinny.linalg.kronecker import Product
from tallskinny_residual import Residual
from tallskinny_residual.block import ResidualBlock


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Wobble(nn.Module):
    """An unregistered module (the torch.func fallback inside a unit): ``a ⊙ sin(x) + x²·c``."""

    def __init__(self, d):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.c = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.a * torch.sin(x) + self.c * x * x


UNITS = {
    "mlp": (lambda: Residual([nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)]), (3, 4)),
    "preactivation": (lambda: Residual([nn.Tanh(), nn.Linear(4, 4)]), (2, 4)),
    "projection_shortcut": (lambda: Residual([nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)], shortcut=nn.Linear(4, 3)), (2, 4)),
    "single_module_unbatched": (lambda: Residual(nn.Linear(4, 4)), (4,)),
    "module_list": (lambda: Residual(nn.ModuleList([nn.Linear(3, 3), nn.Tanh()])), (2, 3)),
    "layernorm_silu": (lambda: Residual([nn.LayerNorm(4), nn.Linear(4, 4), nn.SiLU()]), (2, 4)),
    "nested_with_activation_shortcut": (
        lambda: Residual([Residual([nn.Linear(3, 3), nn.Tanh()]), nn.Sigmoid(), nn.Linear(3, 3)], shortcut=nn.Tanh()),
        (2, 3),
    ),
    "no_parameters": (lambda: Residual([nn.Tanh(), nn.Softplus()]), (2, 3)),
    "fallback_inside": (lambda: Residual([nn.Linear(3, 3), Wobble(3), nn.Linear(3, 3)]), (2, 3)),
    "conv": (lambda: Residual([nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)]), (1, 2, 3, 3)),
    "frozen": (lambda: _frozen(Residual([nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)], shortcut=nn.Linear(3, 3))), (2, 3)),
}


def _frozen(unit):
    unit.inner[0].bias.requires_grad_(False)
    unit.shortcut.weight.requires_grad_(False)
    return unit


@pytest.mark.parametrize("name", UNITS)
def test_residual_block_matches_fallback(name):
    torch.manual_seed(len(name))
    make, shape = UNITS[name]
    module = make()
    if name == "conv":
        pytest.importorskip("tallskinny_conv")
    block = block_for(module)
    assert type(block) is ResidualBlock
    check_block(module, randn(*shape, seed=1))


def test_structure_is_kept():
    """Parameters only in the last inner block: G is that block's own (affine) operator,
    A is exactly zero; a purely linear unit has C = E = 0."""
    unit = Residual([nn.Tanh(), nn.Linear(4, 4)])
    block = block_for(unit)
    o = block.oracle(randn(2, 4), [p.detach() for p in unit.parameters()], randn(2, 4, seed=1))
    assert isinstance(o.G, Product) and isinstance(o.A, Zero)
    assert not isinstance(o.C, Zero) and not isinstance(o.E, Zero)
    unit = Residual([nn.Linear(4, 4)])
    o = block_for(unit).oracle(randn(2, 4), [p.detach() for p in unit.parameters()], randn(2, 4, seed=1))
    assert isinstance(o.A, Zero) and isinstance(o.E, Zero) and not isinstance(o.C, Zero)
    assert torch.allclose(o.F.to_dense(), torch.eye(8, dtype=torch.float64) + torch.kron(torch.eye(2, dtype=torch.float64), unit.inner[0].weight.detach()))
    assert isinstance(block_for(unit).inner_blocks[0], LinearBlock)


def test_residual_module_and_errors():
    unit = Residual([nn.Linear(3, 3), nn.Tanh()], shortcut=nn.Linear(3, 3))
    z = randn(2, 3)
    torch.testing.assert_close(unit(z), unit.shortcut(z) + unit.inner(z))
    assert [n for n, _ in unit.named_parameters()] == ["inner.0.weight", "inner.0.bias", "shortcut.weight", "shortcut.bias"]
    with pytest.raises(ValueError, match="at least one"):
        Residual([])
    with pytest.raises(TypeError, match=r"inner\[1\]"):
        Residual([nn.Tanh(), "relu"])
    with pytest.raises(TypeError, match="shortcut"):
        Residual([nn.Tanh()], shortcut=lambda x: x)
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="share parameters"):
        block_for(Residual([shared, nn.Tanh(), shared]))
    mismatch = block_for(Residual([nn.Linear(3, 2)]))
    params = [p.detach() for p in mismatch.parameters()]
    with pytest.raises(ValueError, match="must agree to be added"):
        mismatch.oracle(randn(2, 3), params, randn(2, 2))
    with pytest.raises(ValueError, match="expected 2 parameter tensors"):
        mismatch.forward(randn(2, 3), params[:1])


def test_subclass_with_own_forward_gets_fallback():
    class Scaled(Residual):
        def forward(self, z):
            return 2 * super().forward(z)

    assert type(block_for(Scaled([nn.Tanh()]))) is FuncBlock


def residual_mlp(units: int, width: int, d_in: int, d_out: int):
    return ([nn.Linear(d_in, width)] + [Residual([nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)])
                                         for _ in range(units)] + [nn.Linear(width, d_out)])


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_residual_mlp_of_16_units_matches_dense(batch):
    torch.manual_seed(batch)
    chain = ts.Chain(residual_mlp(16, 3, 2, 3), nn.CrossEntropyLoss())
    assert sum(isinstance(b, ResidualBlock) for b in chain.blocks) == 16
    gen = torch.Generator().manual_seed(batch)
    X, y = torch.randn(batch, 2, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    negatives = 0
    for damping in (1e-3, 1.0):
        _, inertia = check_against_dense(chain, X, y, damping, gen=gen)
        negatives += inertia[1]
    assert negatives > 0


def test_mixed_residual_chain_against_fallback_units():
    """Units with a projection shortcut, LayerNorm and a fallback module inside; the same
    modules wrapped as whole-unit FuncBlocks give the same solve."""
    torch.manual_seed(5)
    modules = [nn.Linear(3, 4), Residual([nn.LayerNorm(4), nn.Linear(4, 4), nn.GELU()]),
               Residual([nn.Linear(4, 3), Wobble(3)], shortcut=nn.Linear(4, 3)), Residual([nn.Tanh(), nn.Linear(3, 3)]),
               nn.Linear(3, 2)]
    X, y = randn(3, 3, seed=6), torch.tensor([0, 1, 1])
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    fallback = ts.Chain([FuncBlock(m) if isinstance(m, Residual) else m for m in modules], nn.CrossEntropyLoss())
    P = sum(p.numel() for p in chain.parameters())
    b = randn(P, seed=7)
    x = chain.inverse_hvp(X, y, b, damping=1e-2)
    assert rel(x, fallback.inverse_hvp(X, y, b, damping=1e-2)) <= 1e-9
    # the dense reference uses reverse-over-reverse, which is right for LayerNorm
    H = dense_hessian(chain, X, y)
    assert rel(x, torch.linalg.solve(H + 1e-2 * torch.eye(P), b)) <= 1e-9


def test_installing_is_enough():
    code = (
        "from torch import nn; import tallskinny as ts\n"
        "from tallskinny_residual import Residual\n"
        "chain = ts.Chain([Residual([nn.Linear(2, 2), nn.Tanh()])], nn.MSELoss(), strict=True)\n"
        "print(type(chain.blocks[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ResidualBlock"


def _affine_unit_mlp(batch: int, seed: int):
    """``Linear(3, 4)``, three ``z + W tanh(z) + b`` units, ``Linear(4, 3)``, cross-entropy:
    the chain, data, a generator for the checks, and the prepared stages."""
    from tallskinny.testing import stages

    torch.manual_seed(seed)
    units = [Residual([nn.Tanh(), nn.Linear(4, 4)]) for _ in range(3)]
    chain = ts.Chain([nn.Linear(3, 4), *units, nn.Linear(4, 3)], nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(2 + 3 * seed)
    X = randn(batch, 3, seed=3 + 3 * seed)
    y = torch.randint(0, 3, (batch,), generator=gen)
    curv = chain.curvature(X, y)
    return chain, X, y, gen, stages(curv)


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_units_with_a_last_linear_are_affine_stages(damping):
    """``z + W σ(z) + b``: only the last inner block has parameters, so the unit keeps the
    affine G of its Linear and the solver eliminates it as an affine stage (C densely)."""
    from tallskinny.testing import AffineStage

    chain, X, y, gen, stages = _affine_unit_mlp(batch=2, seed=0)
    assert all(isinstance(stages[i], AffineStage) and stages[i].C_span is not None for i in (1, 2, 3))
    check_against_dense(chain, X, y, damping, gen=gen)


@pytest.mark.parametrize("damping", [1e-6, 0.1])
def test_one_sample_affine_units_keep_a_structured_c(damping):
    """At one sample the unit's C = P(Γ ⊗ Ẽ)·D_σ is kept as P(Γ ⊗ ẼD_σ): the solver reads Γ
    and Ẽ (no dense p × a matrix), its dense F = I + W·D_σ takes the one-sample path of a
    Linear's (pivots tested after the sweep), and everything still equals the dense references."""
    from tallskinny.testing import AffineStage

    chain, X, y, gen, stages = _affine_unit_mlp(batch=1, seed=1)
    for i in (1, 2, 3):
        assert isinstance(stages[i], AffineStage) and stages[i].C_span is None and stages[i].Gam is not None
        assert not stages[i].pad  # Ẽ D_σ is not [I; 0]
        assert stages[i].W is not None and torch.equal(stages[i].W, stages[i].F.to_dense())
    check_against_dense(chain, X, y, damping, gen=gen)


def test_units_with_several_parameter_blocks_keep_a_low_rank_A():
    """Parameters in two inner blocks: A couples them, but only through the unit's
    activations (rank ≤ 3·width here), so it is a LowRank and the solver never forms the
    p × p complement (p = 2·(w² + w)); the chain still matches dense references,
    small damping and indefinite systems included."""
    from tallskinny.linalg import LowRank

    torch.manual_seed(11)
    w = 5
    unit = Residual([nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w)])
    o = block_for(unit).oracle(randn(1, w), [p.detach() for p in unit.parameters()], randn(1, w, seed=2))
    p = 2 * (w * w + w)
    assert isinstance(o.A, LowRank) and o.A.shape == (p, p) and o.A.U.shape[1] == 3 * w
    chain = ts.Chain(residual_mlp(4, w, 3, 2), nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 2):
        X, y = torch.randn(batch, 3, generator=gen), torch.randint(0, 2, (batch,), generator=gen)
        negatives = 0
        for damping in (1e-6, 1e-2):
            _, inertia = check_against_dense(chain, X, y, damping, gen=gen)
            negatives += inertia[1]
        assert negatives > 0
