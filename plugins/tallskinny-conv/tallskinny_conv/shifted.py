"""The input Jacobian of a stride-1, zero-padded convolution, applied by shifted GEMMs.

With stride 1 and zero padding, ``y[b, o, i, j] = Σ_{a,c} W_{ac} x_p[b, :, i + a·d_h, j + c·d_w]``
(``W_{ac} = W[:, :, a, c]``, ``m × C``; ``x_p`` the padded input; ``d`` the dilation):
one ``m × C`` product per kernel offset. On ``k`` columns, the entries ``(·, i, j, col)``
of one output row ``i`` over ``j`` and ``col`` are contiguous, and so are those of the
input rows they read: each offset is one batched GEMM over the output rows ``i`` that
adds into its place, and ``Fᵀ`` adds ``W_{ac}ᵀ`` products into the slabs of a padded
input. The gather route ``(W̄ ⊗ I) U_c`` forms the ``K``-times larger patch products
(``K`` the kernel's size) and scatters them back; for many columns that memory traffic
dominates once the patches leave the caches (CHANGELOG); below :data:`SHIFTED_MIN_PATCHES`
entries of patches its two calls are cheaper than ``K`` batched ones, and it is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tallskinny.linalg import LinearOperator

__all__ = ["SHIFTED_MIN_PATCHES", "ShiftedConvolution"]

SHIFTED_MIN_PATCHES = 2**21
"""Products whose unfolded patches (``K·C·B·H_out·W_out`` rows times the columns) would
have at least this many entries (16 MiB in float64) go through the shifted GEMMs."""


class ShiftedConvolution(LinearOperator):
    """``F`` (or, ``transposed``, ``Fᵀ``) of a stride-1 convolution with zero padding, on
    inputs ``(B, C, H, W)`` flattened in that order to outputs ``(B, m, H_out, W_out)``.

    ``weight``: ``m × C × k_h × k_w`` (zero outside each group's channels); ``pads``:
    ``(top, bottom, left, right)``; ``gathered``: the same matrix as another operator (the
    unfolding route), which narrow products and :meth:`to_dense` go through."""

    def __init__(self, weight: Tensor, batch: int, spatial: tuple[int, int], pads: tuple[int, int, int, int],
                 dilation: tuple[int, int], gathered: LinearOperator, *, transposed: bool = False):
        m, C, kh, kw = weight.shape
        H, W = spatial
        top, bottom, left, right = pads
        self.weight, self.batch, self.spatial, self.pads, self.dilation = weight, batch, (H, W), pads, dilation
        self.gathered, self.transposed = gathered, transposed
        self.padded = (H + top + bottom, W + left + right)
        self.out_spatial = (self.padded[0] - dilation[0] * (kh - 1), self.padded[1] - dilation[1] * (kw - 1))
        # the offsets' matrices, W_ac (m × C) for F and W_acᵀ (C × m) for Fᵀ
        per_offset = weight.permute(2, 3, 0, 1).reshape(kh * kw, m, C)
        self.offset_weights = (per_offset.mT if transposed else per_offset).contiguous()
        n_in, n_out = batch * C * H * W, batch * m * self.out_spatial[0] * self.out_spatial[1]
        self.shape = (n_in, n_out) if transposed else (n_out, n_in)
        self.dtype, self.device = weight.dtype, weight.device

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        if dtype == self.dtype:
            return self
        return ShiftedConvolution(self.weight.to(dtype), self.batch, self.spatial, self.pads, self.dilation,
                                  self.gathered.astype(dtype), transposed=self.transposed)

    def to_dense(self) -> Tensor:
        return self.gathered.to_dense()

    def apply_flops(self) -> int:
        return self.gathered.apply_flops()

    def _transpose(self) -> LinearOperator:
        return ShiftedConvolution(self.weight, self.batch, self.spatial, self.pads, self.dilation, self.gathered.T,
                                  transposed=not self.transposed)

    def patches(self, columns: int) -> int:
        """Entries of the unfolded patches of a product with ``columns`` columns."""
        m, C, kh, kw = self.weight.shape
        return kh * kw * C * self.batch * self.out_spatial[0] * self.out_spatial[1] * columns

    def _matmat(self, x: Tensor) -> Tensor:
        if self.patches(x.shape[1]) < SHIFTED_MIN_PATCHES:
            return self.gathered._matmat(x)
        return self._adjoint(x) if self.transposed else self._forward(x)

    def _slabs(self, k: int):
        """``(W_ac, row offset, column slice)`` of every kernel offset, in the padded
        input read as ``C × H_p × (W_p·k)``."""
        kh, kw = self.weight.shape[2:]
        Wo = self.out_spatial[1]
        for index in range(kh * kw):
            a, c = divmod(index, kw)
            start = c * self.dilation[1] * k
            yield self.offset_weights[index], a * self.dilation[0], slice(start, start + Wo * k)

    def _forward(self, x: Tensor) -> Tensor:
        B, (m, C) = self.batch, self.weight.shape[:2]
        (H, W), (Hp, Wp), (Ho, Wo) = self.spatial, self.padded, self.out_spatial
        top, _, left, _ = self.pads
        k = x.shape[1]
        if (Hp, Wp) == (H, W):
            xp = x.contiguous().view(B, C, H, W * k)
        else:
            xp = x.new_zeros(B, C, Hp, Wp, k)
            xp[:, :, top:top + H, left:left + W] = x.reshape(B, C, H, W, k)
            xp = xp.view(B, C, Hp, Wp * k)
        y = x.new_zeros(B, m, Ho, Wo * k)
        for b in range(B):
            rows = y[b].transpose(0, 1)  # (Ho, m, Wo·k)
            for w, i0, cols in self._slabs(k):
                rows.baddbmm_(w.expand(Ho, m, C), xp[b, :, i0:i0 + Ho, cols].transpose(0, 1))
        return y.view(-1, k)

    def _adjoint(self, y: Tensor) -> Tensor:
        B, (m, C) = self.batch, self.weight.shape[:2]
        (H, W), (Hp, Wp), (Ho, Wo) = self.spatial, self.padded, self.out_spatial
        top, _, left, _ = self.pads
        k = y.shape[1]
        y = y.contiguous().view(B, m, Ho, Wo * k)
        xp = y.new_zeros(B, C, Hp, Wp * k)
        for b in range(B):
            source = y[b].transpose(0, 1)  # (Ho, m, Wo·k)
            for w, i0, cols in self._slabs(k):
                xp[b, :, i0:i0 + Ho, cols].transpose(0, 1).baddbmm_(w.expand(Ho, C, m), source)
        if (Hp, Wp) == (H, W):
            return xp.view(-1, k)
        return xp.view(B, C, Hp, Wp, k)[:, :, top:top + H, left:left + W].reshape(-1, k)
