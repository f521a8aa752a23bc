"""The flop count of the elimination (``Curvature.elimination_flops``) against the
operations that actually run: every matrix product, LU, Cholesky, eigenvalue call and
triangular solve of a factorization is intercepted at the ATen level and counted from its
operands' shapes, independently of the stage code."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tallskinny as ts

aten = torch.ops.aten


class Ops(TorchDispatchMode):
    """Flops of the level-3 operations run inside the ``with`` block (module docstring of
    ``tallskinny.elimination.flops`` for the conventions)."""

    def __init__(self):
        super().__init__()
        self.products = self.pivots = self.triangular = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        p = func.overloadpacket
        if p in (aten.mm, aten.addmm, aten.addmm_):
            A, B = (args[0], args[1]) if p is aten.mm else (args[1], args[2])
            self.products += 2 * A.shape[0] * A.shape[1] * B.shape[1]
        elif p in (aten.bmm, aten.baddbmm, aten.baddbmm_):
            A, B = (args[0], args[1]) if p is aten.bmm else (args[1], args[2])
            self.products += 2 * A.shape[0] * A.shape[1] * A.shape[2] * B.shape[2]
        elif p in (aten.linalg_lu_factor_ex, aten.linalg_cholesky_ex, aten.linalg_ldl_factor_ex, aten._linalg_eigh):
            n = args[0].shape[-1]
            per = {aten.linalg_lu_factor_ex: 2 * n**3 // 3, aten.linalg_cholesky_ex: n**3 // 3,
                   aten.linalg_ldl_factor_ex: n**3 // 3}.get(p, 4 * n**3 // 3)
            self.pivots += args[0].numel() // (n * n) * per
        elif p in (aten.linalg_lu_solve, aten.cholesky_solve):
            B = args[2] if p is aten.linalg_lu_solve else args[0]
            self.triangular += 2 * B.shape[-2] * B.numel()
        elif p is aten.linalg_solve_triangular:  # one triangle
            B = args[1]
            self.triangular += B.shape[-2] * B.numel()
        return out


def mlp(widths, batch, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    X = torch.randn(batch, widths[0])
    return ts.Chain(layers, nn.CrossEntropyLoss()), X, torch.randint(0, widths[-1], (batch,))


def residual_mlp(two_layer: bool):
    residual = pytest.importorskip("tallskinny_residual")
    torch.manual_seed(1)

    def unit():
        inner = [nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12)] if two_layer else [nn.Tanh(), nn.Linear(12, 12)]
        return residual.Residual(inner)

    layers = [nn.Linear(6, 12), unit(), unit(), nn.Linear(12, 4)]
    return ts.Chain(layers, nn.CrossEntropyLoss()), torch.randn(1, 6), torch.tensor([1])


def cnn(activation):
    pytest.importorskip("tallskinny_conv")
    torch.manual_seed(2)
    layers = []
    for _ in range(3):
        layers += [nn.Conv2d(3, 3, 3, padding=1), activation()]
    layers += [nn.Flatten(), nn.Linear(3 * 5 * 5, 4)]
    return ts.Chain(layers, nn.CrossEntropyLoss()), torch.randn(1, 3, 5, 5), torch.tensor([2])


MODELS = {
    "run (one sample, 6 layers)": lambda: mlp([10] * 7 + [4], 1),
    "linear, one sample": lambda: mlp([6, 8, 8, 3], 1),
    "linear, batch 5": lambda: mlp([6, 8, 8, 3], 5),
    "residual units": lambda: residual_mlp(False),
    "residual units with A ≠ 0": lambda: residual_mlp(True),
    "cnn, tanh": lambda: cnn(nn.Tanh),
    "cnn, relu (live rows)": lambda: cnn(nn.ReLU),
}


def counted(chain, X, y, kind):
    curvature = chain.curvature(X, y, kind=kind, method="riccati")
    curvature.factorize(1e-2)  # what is made once per curvature (C_⊥ᵀC_⊥) is made here
    with Ops() as ops:
        factorization = curvature.factorize(1e-3)
    b = torch.randn(curvature.layout.numel, 1)
    with Ops() as solve:
        factorization.solve(b, refine=0)
    return curvature.elimination_flops(), ops, solve


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("large", [False, True])
def test_the_count_is_what_runs(float64, name, kind, large):
    """The count equals the dispatched operations, also with the large stages' paths at
    every stage (``testing.large_stage_paths``: the split Schur products)."""
    from tallskinny.testing import large_stage_paths

    with large_stage_paths() if large else contextlib.nullcontext():
        flops, ops, solve = counted(*MODELS[name](), kind)
    assert ops.products > 0
    assert flops.products == ops.products
    assert sum(s.triangular for s in flops.stages) == ops.triangular
    if kind == "ggn":  # every pivot is positive definite: Cholesky, as counted (± rounding)
        assert abs(sum(s.pivots for s in flops.stages) - ops.pivots) <= len(flops.stages)
    else:  # LU counted; a positive definite pivot takes Cholesky (n³/3 less)
        assert ops.pivots <= sum(s.pivots for s in flops.stages) <= 2 * ops.pivots
    # the sweeps' products are counted from their leading terms
    assert 0.5 * (solve.products + solve.triangular) <= flops.solve <= 1.3 * (solve.products + solve.triangular)
    assert flops.total == flops.factorize + flops.solve
    assert flops.factorize == sum(s.products + s.pivots + s.triangular for s in flops.stages)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_lower_bound_is_below_the_count_and_above_half(float64, name):
    chain, X, y = MODELS[name]()
    flops = chain.curvature(X, y, method="riccati").elimination_flops()
    for s in flops.stages:
        assert s.lower <= s.factorize
        assert s.lower >= s.factorize // 3
    assert flops.lower < flops.total


def test_a_one_sample_linear_stage_in_closed_form(float64):
    """A one-sample Linear of ``W`` (``m × w``) after another: ``SW``, ``WᵀSW``, ``Q_ζyᵀK``
    (``2m²w + 4mw²``), the LU ``2m³/3``, ``K = Q⁻¹Q_ζy`` ``2m²w``; lower bound
    ``2m²w + mw² + mw²`` (symmetric halves), ``m³/3`` and ``m²w``."""
    chain, X, y = mlp([5, 7, 9, 3], 1)
    flops = chain.curvature(X, y, method="riccati").elimination_flops()
    middle = flops.stages[2]  # Linear(7, 9): m = 9, w = 7
    assert middle.kind == "AffineStage"
    m, w = 9, 7
    assert middle.products == 2 * m * m * w + 4 * m * w * w
    assert middle.pivots == 2 * m**3 // 3
    assert middle.triangular == 2 * m * m * w
    assert middle.lower == 2 * m * m * w + 2 * m * w * w + m**3 // 3 + m * m * w
    assert middle.size == m


def test_the_count_grows_with_width_batch_and_depth(float64):
    def total(widths, batch):
        chain, X, y = mlp(widths, batch)
        return chain.curvature(X, y, method="riccati").elimination_flops().total

    assert total([8, 8, 8, 3], 1) < total([8, 16, 16, 3], 1) < total([8, 32, 32, 3], 1)
    assert total([8, 8, 8, 3], 1) < total([8, 8, 8, 3], 2) < total([8, 8, 8, 3], 4)
    assert total([8] * 4 + [3], 1) < total([8] * 8 + [3], 1)


def test_solve_columns_scale_the_solve_only(float64):
    chain, X, y = mlp([6, 8, 8, 3], 2)
    curvature = chain.curvature(X, y, method="riccati")
    one, four = curvature.elimination_flops(), curvature.elimination_flops(columns=4)
    assert four.solve == 4 * one.solve and four.factorize == one.factorize
    with pytest.raises(ValueError, match="columns"):
        curvature.elimination_flops(columns=0)
