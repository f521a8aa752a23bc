"""Analytic losses against their torch.func fallback (1e-12) and the closed forms; bad targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tallskinny.blocks import FuncLoss, UnsupportedModuleError, loss_for
from tallskinny.blocks.losses import CrossEntropyLossBlock, MSELossBlock
from tallskinny.blocks.testing import check_loss
from tallskinny.linalg import Dense, ScaledIdentity

f64 = torch.float64


def randn(*shape, seed=0, dtype=f64, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(*shape, classes, seed=0):
    return torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))


def probabilities(*shape, seed=0, dim=1):
    return torch.softmax(randn(*shape, seed=seed, scale=2.0), dim=dim)


# -- cross-entropy --------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_cross_entropy_matches_fallback(classes, batch, reduction):
    module = nn.CrossEntropyLoss(reduction=reduction)
    assert isinstance(loss_for(module), CrossEntropyLossBlock)
    z = randn(batch, classes, seed=batch, scale=3.0)
    check_loss(module, z, labels(batch, classes=classes, seed=classes))


def test_cross_entropy_closed_form():
    """F = (softmax − onehot)/B and E = blockdiag_s(diag p_s − p_s p_sᵀ)/B, entry by entry."""
    B, C = 4, 3
    z, y = randn(B, C, seed=1, scale=2.0), labels(B, classes=C, seed=2)
    o = loss_for(nn.CrossEntropyLoss()).oracle(z, y)
    p = torch.softmax(z, dim=1)
    expected_F = (p - nn.functional.one_hot(y, C).to(f64)) / B
    assert torch.allclose(o.F.to_dense(), expected_F.reshape(1, -1), rtol=1e-14, atol=1e-15)
    E = o.E.to_dense()
    for s in range(B):
        for t in range(B):
            block = E[s * C : (s + 1) * C, t * C : (t + 1) * C]
            expected = (torch.diag(p[s]) - torch.outer(p[s], p[s])) / B if s == t else torch.zeros(C, C, dtype=f64)
            assert torch.allclose(block, expected, rtol=1e-14, atol=1e-15)
    assert isinstance(o.E, Dense) and o.E.symmetric
    assert o.G.shape == (1, 0) and o.A.shape == (0, 0) and o.C.shape == (0, B * C)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "options",
    [
        dict(weight=True),
        dict(label_smoothing=0.2),
        dict(ignore_index=1),
        dict(weight=True, label_smoothing=0.15, ignore_index=2),
        dict(ignore_index=-100),
    ],
    ids=["weight", "smoothing", "ignore", "all", "ignore-no-hit"],
)
def test_cross_entropy_options(options, reduction):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=f64)
    module = nn.CrossEntropyLoss(reduction=reduction, **options)
    z = randn(5, 4, seed=3, scale=2.0)
    y = torch.tensor([0, 1, 2, 1, 3])  # hits ignore_index 1 (twice) or 2 (once)
    check_loss(module, z, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_probability_targets(weighted, smoothing, reduction):
    weight = torch.tensor([1.0, 0.3, 2.0], dtype=f64) if weighted else None
    module = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing, reduction=reduction)
    check_loss(module, randn(4, 3, seed=4, scale=2.0), probabilities(4, 3, seed=5))


@pytest.mark.parametrize(
    "z_shape, target",
    [
        ((2, 3, 2, 2), "labels"),
        ((3, 4, 2), "labels"),
        ((2, 3, 2, 2), "probabilities"),
        ((4,), "labels"),
        ((4,), "probabilities"),
    ],
)
def test_cross_entropy_extra_and_no_batch_dims(z_shape, target):
    """(B, C, d1, ...) and unbatched (C,) inputs: the Hessian is reordered to z's row-major order."""
    z = randn(*z_shape, seed=6, scale=2.0)
    C = z_shape[1] if len(z_shape) > 1 else z_shape[0]
    if target == "labels":
        shape = z_shape[:1] + z_shape[2:] if len(z_shape) > 1 else ()
        y = labels(*shape, classes=C, seed=7)
    else:
        y = probabilities(*z_shape, seed=7, dim=1 if len(z_shape) > 1 else 0)
    weight = torch.linspace(0.5, 1.5, C, dtype=f64)
    check_loss(nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1), z, y)
    check_loss(nn.CrossEntropyLoss(reduction="sum"), z, y)


def test_cross_entropy_uint8_targets():
    check_loss(nn.CrossEntropyLoss(), randn(3, 4, seed=8), torch.tensor([3, 0, 1], dtype=torch.uint8))


def test_cross_entropy_float32():
    z = randn(4, 3, seed=9, dtype=torch.float32)
    o = check_loss(nn.CrossEntropyLoss(label_smoothing=0.1), z, labels(4, classes=3))
    assert o.F.dtype == torch.float32 and o.E.dtype == torch.float32


# -- mean squared error ---------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(1,), (3,), (1, 2), (4, 2), (5, 3), (2, 3, 2)])
def test_mse_matches_fallback_and_closed_form(shape, reduction):
    module = nn.MSELoss(reduction=reduction)
    assert isinstance(loss_for(module), MSELossBlock)
    z, y = randn(*shape, seed=10), randn(*shape, seed=11)
    o = check_loss(module, z, y)
    N = z.numel()
    scale = 2.0 / N if reduction == "mean" else 2.0
    assert torch.allclose(o.F.to_dense(), (scale * (z - y)).reshape(1, -1), rtol=1e-15, atol=0)
    assert isinstance(o.E, ScaledIdentity) and o.E.scale == pytest.approx(scale, rel=1e-15)


def test_mse_float32():
    o = check_loss(nn.MSELoss(), randn(3, 2, seed=12, dtype=torch.float32), randn(3, 2, seed=13, dtype=torch.float32))
    assert o.E.dtype == torch.float32


# -- reductions and bad targets -------------------------------------------------------------
@pytest.mark.parametrize("module", [nn.CrossEntropyLoss(reduction="none"), nn.MSELoss(reduction="none")], ids=repr)
def test_reduction_none_is_refused(module):
    with pytest.raises(ValueError, match=r"reduction='none'.* does not return a scalar"):
        loss_for(module)


CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize(
    "module, z, target, error, message",
    [
        (CE, randn(3, 4), torch.tensor([0, 1, 4]), ValueError, r"lie in \[0, 4\).*found 4"),
        (CE, randn(3, 4), torch.tensor([0, -1, 2]), ValueError, r"lie in \[0, 4\).*found -1"),
        (CE, randn(3, 4), torch.tensor([[0], [1], [2]]), ValueError, r"must have shape \(3,\), got \(3, 1\)"),
        (CE, randn(3, 4), torch.tensor([0, 1]), ValueError, r"must have shape \(3,\), got \(2,\)"),
        (CE, randn(3, 4), torch.tensor([0, 1, 2], dtype=torch.int32), TypeError, "torch.int64 or torch.uint8"),
        (CE, randn(3, 4), torch.tensor([0.0, 1.0, 2.0], dtype=f64), ValueError, "class-probability targets"),
        (CE, randn(3, 4), probabilities(3, 4).float(), ValueError, "dtype torch.float64"),
        (CE, randn(3, 4), [0, 1, 2], TypeError, "must be a tensor"),
        (CE, randn(3, 4), torch.tensor([True, False, True]), TypeError, "class indices"),
        (CE, randn(()), torch.tensor(0), ValueError, "logits of shape"),
        (nn.CrossEntropyLoss(ignore_index=2), randn(2, 3), torch.tensor([2, 2]), ValueError, "NaN"),
        (
            nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0, 1.0], dtype=f64)),
            randn(2, 3),
            torch.tensor([0, 0]),
            ValueError,
            "total weight",
        ),
        (
            nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float32)),
            randn(2, 3),
            torch.tensor([0, 1]),
            TypeError,
            "class weights",
        ),
        (
            nn.CrossEntropyLoss(weight=torch.ones(4, dtype=f64)),
            randn(2, 3),
            torch.tensor([0, 1]),
            TypeError,
            r"shape \(3,\)",
        ),
        (nn.MSELoss(), randn(3, 2), torch.ones(3, 2, dtype=torch.int64), TypeError, "floating-point"),
        (nn.MSELoss(), randn(3, 2), randn(3, 1), ValueError, r"shape of z \(3, 2\), got \(3, 1\)"),
        (nn.MSELoss(), randn(3, 2), randn(3, 2, dtype=torch.float32), TypeError, "dtype torch.float32"),
        (nn.MSELoss(), randn(3, 2), "y", TypeError, "floating-point tensor"),
        (nn.MSELoss(), randn(3, 2), torch.full((3, 2), float("nan"), dtype=f64), ValueError, "NaN"),
    ],
)
def test_bad_targets_raise_clear_errors(module, z, target, error, message):
    block = loss_for(module)
    with pytest.raises(error, match=message):
        block.check_target(z, target)
    with pytest.raises(error, match=message):
        block.oracle(z, target)


def test_ignored_targets_with_sum_are_fine():
    """With reduction='sum' an all-ignored batch is a well-defined zero loss."""
    module = nn.CrossEntropyLoss(ignore_index=1, reduction="sum")
    o = check_loss(module, randn(2, 3, seed=14), torch.tensor([1, 1]))
    assert torch.equal(o.F.to_dense(), torch.zeros(1, 6, dtype=f64))


def test_nonfinite_logits_are_refused():
    z = randn(2, 3)
    z[0, 1] = float("inf")
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        loss_for(CE).oracle(z, torch.tensor([0, 1]))


def test_subclass_overriding_forward_gets_the_fallback():
    class Doubled(nn.CrossEntropyLoss):
        def forward(self, z, target):
            return 2 * super().forward(z, target)

    assert isinstance(loss_for(Doubled()), FuncLoss)
    with pytest.raises(UnsupportedModuleError, match="overrides forward"):
        loss_for(Doubled(), strict=True)
    check_loss(Doubled(), randn(3, 4, seed=15), labels(3, classes=4))
