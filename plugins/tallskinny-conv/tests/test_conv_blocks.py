"""Every conv/pool block against the torch.func fallback (tallskinny.blocks.testing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tallskinny.blocks import FuncBlock, block_for
from tallskinny.blocks.testing import check_block
from tallskinny.linalg import Dense, Identity, Zero
from tallskinny.linalg.kronecker import Kronecker, Permutation, Product
from tallskinny_conv.conv import ConvBlock
from tallskinny_conv.operators import Gather, Scatter
from tallskinny_conv.pool import AvgPoolBlock, MaxPoolBlock

f64 = torch.float64


def randn(*shape, seed=0, dtype=f64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded(module, seed=0, dtype=f64):
    module = module.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return module


CONV_CASES = {
    "plain": (lambda: nn.Conv2d(2, 3, 3), (2, 2, 4, 4)),
    "stride_padding_dilation": (lambda: nn.Conv2d(2, 2, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (1, 2, 3, 4)),
    "groups_same": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding="same"), (1, 4, 3, 3)),
    "depthwise_no_bias_reflect": (lambda: nn.Conv2d(2, 4, 3, groups=2, bias=False, padding=1, padding_mode="reflect"), (2, 2, 3, 3)),
    "circular_unbatched": (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), (2, 3, 3)),
    "replicate_same_even_kernel": (lambda: nn.Conv2d(2, 2, 2, padding="same", padding_mode="replicate"), (1, 2, 3, 3)),
    "valid": (lambda: nn.Conv2d(1, 2, 2, padding="valid"), (3, 1, 3, 3)),
    "conv1d": (lambda: nn.Conv1d(3, 2, 3, stride=2, padding=1), (2, 3, 7)),
    "conv1d_depthwise_dilated_same": (lambda: nn.Conv1d(4, 4, 4, groups=4, padding="same", dilation=2), (2, 4, 9)),
    "conv1d_circular_unbatched": (lambda: nn.Conv1d(2, 3, 2, padding=1, padding_mode="circular"), (2, 5)),
}


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_block_matches_fallback(name):
    make, shape = CONV_CASES[name]
    module = seeded(make(), seed=len(name))
    assert type(block_for(module)) is ConvBlock
    oracle = check_block(module, randn(*shape, seed=1))
    assert isinstance(oracle.A, Zero) and isinstance(oracle.E, Zero)
    assert not bool((oracle.C.to_dense() == 0).all())


@pytest.mark.parametrize("name", ["plain", "stride_padding_dilation", "groups_same", "depthwise_no_bias_reflect",
                                  "circular_unbatched", "conv1d_depthwise_dilated_same"])
def test_conv_blocks_of_f_and_c_are_made_from_the_nonzeros(name):
    """``dense_block(rows, cols)`` of ``F`` and ``C`` (the dense stages' live rows and
    columns next to ReLUs; ``C``'s rows in ``Θ̃ᵀ`` order for the affine stage) is built by
    one scatter without the whole matrix, and equals the selection from ``to_dense()``:
    rows and columns in any order, repeated or all (``None``), padding, wrap-around and
    groups included; so do the transposes', and the blocks once the dense matrix is kept.
    The reference multiplies through the operators' factors."""
    make, shape = CONV_CASES[name]
    module = seeded(make(), seed=len(name))
    z = randn(*shape, seed=1)
    values = (module.weight.detach(), None if module.bias is None else module.bias.detach())
    oracle = block_for(module).compute_oracle(z, values, randn(*module(z).shape, seed=2))
    gen = torch.Generator().manual_seed(3)
    for op in (oracle.F, oracle.C):
        m, n = op.shape
        rows = torch.randint(0, m, (m // 2 + 1,), generator=gen)
        cols = torch.randperm(n, generator=gen)[: n // 2 + 1]
        repeated = torch.randint(0, n, (n,), generator=gen)  # (some columns twice or more)
        got = [op.dense_block(rows, cols), op.dense_block(rows), op.dense_block(None, cols), op.T.dense_block(cols, rows),
               op.dense_block(rows, repeated), op.T.dense_block(repeated, rows)]
        dense = Product(*op.factors).to_dense()  # through the factors: an independent reference
        expected = [dense[rows][:, cols], dense[rows], dense[:, cols], dense[rows][:, cols].mT,
                    dense[rows][:, repeated], dense[rows][:, repeated].mT]
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        assert bool(expected[0].any())
        assert torch.equal(op.astype(torch.float32).dense_block(rows, cols), expected[0].float())  # (mixed precision)
        assert torch.equal(op.to_dense(), dense)
        assert torch.equal(op.dense_block(rows, cols), expected[0])  # from the kept dense matrix


SHIFTED_CASES = {
    "padded_batched": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6)),
    "dilated_grouped_rectangular": (lambda: nn.Conv2d(4, 6, (2, 3), padding=(1, 0), dilation=(2, 1), groups=2), (3, 4, 6, 7)),
    "same_even_kernel": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (1, 2, 6, 6)),
    "valid_unbatched": (lambda: nn.Conv2d(2, 3, 3, bias=False), (2, 6, 6)),
    "conv1d_dilated": (lambda: nn.Conv1d(3, 2, 3, padding=2, dilation=2), (2, 3, 9)),
    "conv1d_same_unbatched": (lambda: nn.Conv1d(3, 3, 2, padding="same"), (3, 8)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # (torch's own forward)
@pytest.mark.parametrize("name", SHIFTED_CASES)
def test_stride_one_zero_padded_convolutions_apply_f_by_shifted_gemms(name, monkeypatch):
    """``F`` of a stride-1 convolution with zero padding is a :class:`ShiftedConvolution`:
    products with ``F`` and ``Fᵀ`` whose patches reach ``SHIFTED_MIN_PATCHES`` entries
    (shifted GEMMs; the threshold lowered to 5 columns' worth here) and smaller ones (the
    unfolding) equal the dense matrix's, for contiguous, transposed and strided
    right-hand sides, in float32 too. Other strides and padding modes keep the unfolding."""
    from tallskinny_conv import shifted

    make, shape = SHIFTED_CASES[name]
    module = seeded(make(), seed=len(name))
    z = randn(*shape, seed=1)
    values = (module.weight.detach(), None if module.bias is None else module.bias.detach())
    F = block_for(module).compute_oracle(z, values, randn(*module(z).shape, seed=2)).F
    assert [type(f) for f in F.factors] == [shifted.ShiftedConvolution]
    wide = 5
    monkeypatch.setattr(shifted, "SHIFTED_MIN_PATCHES", F.factors[0].patches(wide))
    dense = F.to_dense()
    gen = torch.Generator().manual_seed(3)
    for op, ref in ((F, dense), (F.T, dense.mT)):
        for k in (1, wide - 1, wide, wide + 3):
            x = torch.randn(op.shape[1], k, generator=gen, dtype=f64)
            for operand in (x, x.mT.contiguous().mT, torch.randn(op.shape[1], 2 * k, generator=gen, dtype=f64)[:, ::2]):
                torch.testing.assert_close(op.matmat(operand), ref @ operand, rtol=0, atol=1e-13 * float(ref.abs().max()))
            got32 = op.astype(torch.float32).matmat(x.float())
            torch.testing.assert_close(got32.double(), ref @ x, rtol=0, atol=1e-5 * float((ref.abs() @ x.abs()).max()))
    # the shifted route was taken above from 5 columns on, the unfolding below
    calls = []
    monkeypatch.setattr(shifted.ShiftedConvolution, "_forward", lambda self, x: calls.append(x.shape[1]) or self.gathered.matmat(x))
    F.matmat(torch.zeros(F.shape[1], wide, dtype=f64))
    F.matmat(torch.zeros(F.shape[1], wide - 1, dtype=f64))
    assert calls == [wide]
    for make_other in (lambda: nn.Conv2d(2, 2, 3, stride=2, padding=1), lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")):
        other = seeded(make_other())
        z = randn(1, 2, 5, 5)
        o = block_for(other).compute_oracle(z, (other.weight.detach(), other.bias.detach()), randn(*other(z).shape))
        assert not any(isinstance(f, shifted.ShiftedConvolution) for f in o.F.factors)


def test_conv_frozen_parameters_and_float32():
    module = seeded(nn.Conv2d(2, 3, 3))
    module.weight.requires_grad_(False)
    oracle = check_block(module, randn(2, 2, 4, 4))
    assert oracle.G.shape == (2 * 3 * 4, 3) and isinstance(oracle.C, Zero)
    module = seeded(nn.Conv2d(2, 4, 3, groups=2))
    module.bias.requires_grad_(False)
    check_block(module, randn(2, 2, 4, 4))
    check_block(seeded(nn.Conv2d(2, 3, 3), dtype=torch.float32), randn(2, 2, 4, 4, dtype=torch.float32))


def test_conv_groups1_has_the_affine_form_of_linear():
    """G = P_out (I_m ⊗ X̃) P_θ with X̃ = [patches | 1] and C = P_θᵀ (Γ ⊗ Ẽ) U."""
    module = seeded(nn.Conv2d(2, 3, 2, stride=2))
    z = randn(2, 2, 4, 4)
    o = block_for(module).oracle(z, [p.detach() for p in module.parameters()], randn(2, 3, 2, 2, seed=1))
    p_out, kron, p_theta = o.G.factors
    assert isinstance(p_out, Permutation) and isinstance(p_theta, Permutation)
    assert isinstance(kron, Kronecker) and isinstance(kron.left, type(Identity(1))) and kron.left.scale == 1.0
    X = kron.right.matrix
    # stride 2, kernel 2: the patches tile the input, rows (b, position), columns (c, kh, kw) and a ones column
    patches = z.reshape(2, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(8, 8)
    assert torch.equal(X, torch.cat([patches, torch.ones(8, 1, dtype=f64)], dim=1))
    assert isinstance(o.C, Product) and len(o.C.factors) == 3
    perm, ckron, unfold = o.C.factors
    assert torch.equal(perm.index, torch.argsort(p_theta.index))
    assert isinstance(ckron.left, Dense) and isinstance(ckron.right, Dense) and isinstance(unfold, Gather)


POOL_CASES = {
    "avg": (lambda: nn.AvgPool2d(2), (2, 3, 4, 4)),
    "avg_ceil_no_pad_count": (lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (2, 2, 5, 5)),
    "avg_divisor_unbatched": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 4, 4)),
    "avg1d": (lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 3, 6)),
    "adaptive_avg": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 2, 5, 7)),
    "adaptive_avg1d": (lambda: nn.AdaptiveAvgPool1d(3), (2, 2, 7)),
    "max": (lambda: nn.MaxPool2d(2), (2, 3, 4, 4)),
    "max_padded_ceil_dilated": (lambda: nn.MaxPool2d(2, stride=2, padding=1, dilation=2, ceil_mode=True), (2, 2, 5, 5)),
    "max1d_overlapping": (lambda: nn.MaxPool1d(2, stride=1), (2, 3, 5)),
}


@pytest.mark.parametrize("name", POOL_CASES)
def test_pool_block_matches_fallback(name):
    make, shape = POOL_CASES[name]
    module = make()
    block = block_for(module)
    assert isinstance(block, (AvgPoolBlock, MaxPoolBlock))
    oracle = check_block(module, randn(*shape, seed=3))
    assert isinstance(oracle.E, Zero) and oracle.G.shape[1] == 0


def test_maxpool_selects_the_maximum():
    z = torch.tensor([[[[1.0, 5.0], [3.0, 2.0]]]], dtype=f64)
    o = block_for(nn.MaxPool2d(2)).oracle(z, [], torch.ones(1, 1, 1, 1, dtype=f64))
    assert torch.equal(o.F.to_dense(), torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=f64))


def test_gather_and_scatter():
    index = torch.tensor([2, -1, 0, 2])
    S = Gather(index, 3)
    dense = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=f64)
    assert torch.equal(S.to_dense(), dense)
    x, y = randn(3, 2), randn(4, 2, seed=1)
    torch.testing.assert_close(S @ x, dense @ x, rtol=0, atol=0)
    assert isinstance(S.T, Scatter)
    torch.testing.assert_close(S.T @ y, dense.mT @ y, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(S.T.to_dense(), dense.mT)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        Gather(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="int64"):
        Gather(torch.tensor([0.0]), 3)


def test_errors_before_any_work():
    block = block_for(seeded(nn.Conv2d(2, 3, 3)))
    params = [p.detach() for p in block.parameters()]
    with pytest.raises(ValueError, match="in_channels = 2"):
        block.forward(randn(1, 3, 4, 4), params)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        block.oracle(randn(4, 4), params, randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        block.oracle(randn(1, 2, 2, 4), params, randn(1, 3, 1, 2))
    with pytest.raises(ValueError, match="shape of the output"):
        block.oracle(randn(1, 2, 4, 4), params, randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        block.oracle(torch.full((1, 2, 4, 4), float("inf"), dtype=f64), params, randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="expected 2 parameter tensors"):
        block.oracle(randn(1, 2, 4, 4), params[:1], randn(1, 3, 2, 2))
    with pytest.raises(TypeError, match="return_indices"):
        block_for(nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(ValueError, match="4 dims"):
        block_for(nn.MaxPool2d(2)).oracle(randn(4, 4), [], randn(2, 2))


def test_conv3d_and_subclasses_get_the_fallback():
    assert type(block_for(nn.Conv3d(1, 1, 1))) is FuncBlock

    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    assert type(block_for(Doubled(1, 1, 1))) is FuncBlock


def test_installing_is_enough():
    """A fresh interpreter that never imports tallskinny_conv finds the conv block."""
    code = (
        "import sys; from torch import nn; import tallskinny as ts\n"
        "chain = ts.Chain([nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)], nn.CrossEntropyLoss())\n"
        "print(type(chain.blocks[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ConvBlock"
