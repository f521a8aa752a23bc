"""``nn.Conv1d`` and ``nn.Conv2d``: a convolution is a linear layer on unfolded patches.

Inputs ``(B, C, H, W)`` (``Conv1d``: ``(B, C, L)``, treated as ``H = 1``; unbatched
inputs as ``B = 1``). Padding (any ``padding_mode``, ``'same'``/``'valid'`` included)
followed by unfolding is a selection ``U`` (:class:`~tallskinny_conv.operators.Gather`):
``X = U x`` is the ``R × q_w`` patch matrix, one row per (sample ``b``, output position
``l``), ``R = B·L``, one column per (input channel ``c``, kernel offset ``k``),
``q_w = C·K``. With ``W̄`` the ``m × q_w`` weight matrix (``m`` = out_channels; for
``groups > 1`` block-sparse, zero outside each group's channels) and
``Θ̃ = [W̄ | b]`` (the trainable parts; ``X̃ = [X | 1]``), the output read as
(position, channel) is ``X̃ Θ̃ᵀ``. Hence, with ``P_out`` reordering ``(o, b, l)`` and
``P'`` reordering ``(b, l, o)`` to the flat ``(b, o, l)`` layout and ``J`` the
injection ``θ ↦ vec Θ̃`` (a permutation for ``groups = 1``):

* ``G = P_out (I_m ⊗ X̃) J``                — exactly the affine form of ``nn.Linear``;
* ``F = P' (I_R ⊗ W̄) U = P (W̄ ⊗ I_R) U_c`` (``U_c``: ``U``'s rows ordered ``(c·k, b, l)``;
  ``P`` reorders ``(o, b, l)``, the identity at ``B = 1``), applied in the second form;
* ``C = Jᵀ (Γ ⊗ Ẽ) U`` with ``Γ[o, (b,l)] = g[b, o, l]`` and ``Ẽ = [I_{q_w}; 0]``
  (``θᵀ C y = ⟨Θ̃, Γ (U y) Ẽᵀ⟩``: the weight gradient of ``⟨g, conv(y)⟩``);
* ``A = 0``, ``E = 0`` (bilinear).

``C`` is the affine form ``Jᵀ(Γ ⊗ Ẽ)`` followed by the input map ``U``; a solver stage
that accepts such a trailing input map can treat convolutions like linear layers.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as Fn

from tallskinny.blocks import Block, Oracle, register
from tallskinny.blocks.checks import check_input, check_params
from tallskinny.blocks.linear import weight_bias_order
from tallskinny.linalg import Dense, Identity, LinearOperator, Zero
from tallskinny.linalg.kronecker import Kronecker, Permutation, Product

from .operators import DirectProduct, Gather
from .shifted import ShiftedConvolution

__all__ = ["ConvBlock", "conv_forward", "conv_padding", "patch_index"]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def conv_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """The explicit padding ``(left, right)`` per spatial dim, *last dim first* (``F.pad`` order)."""
    dims = len(module.kernel_size)
    pads: list[int] = []
    for i in reversed(range(dims)):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[i]
        pads += [left, right]
    return tuple(pads)


def conv_forward(module: nn.Conv1d | nn.Conv2d, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The module's convolution with the given weight and bias (explicit padding first)."""
    conv = Fn.conv1d if len(module.kernel_size) == 1 else Fn.conv2d
    z = Fn.pad(z, conv_padding(module), mode=_PAD_MODES[module.padding_mode])
    return conv(z, weight, bias, module.stride, 0, module.dilation, module.groups)


@functools.lru_cache(maxsize=128)
def _patch_index_cached(channels, height, width, kernel, stride, dilation, pads, mode, device) -> Tensor:
    numbers = torch.arange(1, channels * height * width + 1, dtype=torch.float64, device=device)
    if height == 1 and len(pads) == 2:  # Conv1d: pad the length only
        x = numbers.reshape(1, channels, width)
        x = Fn.pad(x, pads, mode=mode).unsqueeze(2)
    else:
        x = Fn.pad(numbers.reshape(1, channels, height, width), pads, mode=mode)
    cols = Fn.unfold(x, kernel, dilation=dilation, stride=stride)[0]  # (C·K, L), entries index+1 or 0
    return cols.round().long() - 1


def patch_index(module: nn.Conv1d | nn.Conv2d, channels: int, spatial: tuple[int, ...], device) -> Tensor:
    """``(C·K, L)``: which entry of one sample's flattened input sits in each patch
    slot (``−1`` for a zero of the padding)."""
    one_d = len(module.kernel_size) == 1
    height, width = (1, spatial[0]) if one_d else spatial
    kernel = (1,) + tuple(module.kernel_size) if one_d else tuple(module.kernel_size)
    stride = (1,) + tuple(module.stride) if one_d else tuple(module.stride)
    dilation = (1,) + tuple(module.dilation) if one_d else tuple(module.dilation)
    return _patch_index_cached(
        channels, height, width, kernel, stride, dilation, conv_padding(module), _PAD_MODES[module.padding_mode],
        torch.device(device),
    )


class ConvBlock(Block):
    """Analytic block of ``nn.Conv1d``/``nn.Conv2d`` (stride, padding and its modes,
    dilation, groups, bias; frozen parameters are constants)."""

    module: nn.Conv1d | nn.Conv2d

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        weight, bias = self._weight_bias(z, params, "forward")
        return conv_forward(self.module, z, weight, bias)

    def checked_parameters(self, z: Tensor, params: Sequence[Tensor], where: str):
        return self._weight_bias(z, params, "oracle")

    def output_shape(self, z: Tensor, values) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(conv_forward(self.module, z, values[0].detach(), None).shape)

    def compute_oracle(self, z: Tensor, values, g: Tensor, *, second_order: bool = True) -> Oracle:
        weight, _ = values
        module = self.module

        dims = len(module.kernel_size)
        batched = z.dim() == dims + 2
        C = module.in_channels
        spatial = tuple(z.shape[-dims:])
        per_sample = C * _prod(spatial)
        B = z.shape[0] if batched else 1
        idx = patch_index(module, C, spatial, z.device)  # (q_w, L)
        q_w, L = idx.shape
        m, R, a_in = module.out_channels, B * L, z.numel()

        # U: rows (b, l, c·k)
        offsets = (torch.arange(B, device=z.device) * per_sample).reshape(B, 1, 1)
        rows = idx.mT.unsqueeze(0).expand(B, L, q_w)
        U = Gather(torch.where(rows >= 0, rows + offsets, rows).reshape(-1), a_in, dtype=z.dtype, check=False)
        W_bar = _weight_matrix(weight.detach(), module.groups, C)
        # F = P (W̄ ⊗ I_R) U_c with U_c the unfolding's rows ordered (c·k, b, l): one GEMM
        # with W̄ for all positions (and one with W̄ᵀ for Fᵀ), and P = I at one sample
        U_c = Gather(U.index.view(B, L, q_w).permute(2, 0, 1).reshape(-1), a_in, dtype=z.dtype, check=False)
        per_channel = Kronecker(Dense(W_bar), Identity(R, dtype=z.dtype, device=z.device))
        gathered = [Permutation(_channels_inside(B, L, m, z.device), dtype=z.dtype)] if B > 1 else []
        gathered += [per_channel, U_c]
        if module.padding_mode == "zeros" and all(s == 1 for s in module.stride):
            # (the same matrix; wide products by shifted GEMMs, without the patches)
            gathered = [_shifted(module, W_bar, B, spatial, Product(*gathered))]
        F = DirectProduct(
            *gathered,
            dense=lambda: _jacobian_dense(U, W_bar, B, L),
            block=lambda rows, cols: _on_distinct_columns(lambda c: _jacobian_dense(U, W_bar, B, L, rows, c), cols),
        )

        trainable = set(self.parameter_names())
        with_weight = "weight" in trainable
        with_bias = module.bias is not None and "bias" in trainable
        p = sum(t.numel() for t in self.parameters())  # the checked params have these shapes
        zero = dict(dtype=z.dtype, device=z.device)
        if p == 0:
            return Oracle(G=Zero(g.numel(), 0, **zero), F=F, A=Zero(0, 0, **zero),
                          C=Zero(0, a_in, **zero), E=Zero(a_in, a_in, **zero))
        columns = ([(U @ z.reshape(-1)).reshape(R, q_w)] if with_weight else []) + (
            [z.new_ones(R, 1)] if with_bias else []
        )
        X_tilde = torch.cat(columns, dim=1)
        q = X_tilde.shape[1]
        J = _theta_injection(module, C, q_w, with_weight, with_bias, p, z)
        out_order = torch.arange(m * R, device=z.device).reshape(m, B, L).permute(1, 0, 2).reshape(-1)
        G = DirectProduct(
            Permutation(out_order, dtype=z.dtype),
            Kronecker(Identity(m, dtype=z.dtype, device=z.device), Dense(X_tilde)),
            J,
            dense=lambda: _parameter_jacobian_dense(X_tilde, J, m, B, L),
        )
        if not second_order or not with_weight:
            C_op: LinearOperator = Zero(p, a_in, **zero)
        else:
            Gamma = g.reshape(B, m, L).permute(1, 0, 2).reshape(m, R)
            E_tilde = torch.eye(q, q_w, dtype=z.dtype, device=z.device)
            Gamma = Gamma.contiguous()
            C_op = DirectProduct(
                J.T, Kronecker(Dense(Gamma), Dense(E_tilde)), U, dense=lambda: _mixed_dense(U, Gamma, J, q, a_in),
                block=lambda rows, cols: _on_distinct_columns(lambda c: _mixed_dense(U, Gamma, J, q, a_in, rows, c), cols),
            )
        return Oracle(G=G, F=F, A=Zero(p, p, **zero), C=C_op, E=Zero(a_in, a_in, **zero))

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Kept: the patch matrix ``X̃`` (``R × q``, ``R = B·L`` rows), ``Γ`` (``m × R``), ``Ẽ``
        (``q × q_w``), the int64 indices of the unfolding in two row orders (``4R·q_w``, the cached patch
        index ``2q_w·L``) and of the permutations (``m·(2R + q)``); scratch: the patches
        before the bias column and ``Γ`` before its copy, the unfolding's rows
        (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        module = self.module
        dims = len(module.kernel_size)
        B = z_in[0] if len(z_in) == dims + 2 else 1
        q_w = module.in_channels * _prod(module.kernel_size)
        L = _prod(z_out[-dims:])
        m, R, q = module.out_channels, B * L, q_w + 1
        kept = (R * q + m * R + (q * q_w if second_order else 0)) * itemsize
        kept += 8 * (4 * R * q_w + 2 * q_w * L + _prod(z_in[-dims - 1:]) + m * (2 * R + q))
        return kept, (R * q_w + m * R) * itemsize + 8 * R * q_w

    def _weight_bias(self, z, params, method: str) -> tuple[Tensor, Tensor | None]:
        where = self._where(method)
        check_input(z, where)
        params = check_params(self.parameters(), params, z, where)
        module = self.module
        dims = len(module.kernel_size)
        names = ["C, L", "N, C, L"] if dims == 1 else ["C, H, W", "N, C, H, W"]
        if z.dim() not in (dims + 1, dims + 2) or z.shape[-dims - 1] != module.in_channels:
            raise ValueError(
                f"{where}: the input must have shape ({names[1]}) or ({names[0]}) with C = "
                f"in_channels = {module.in_channels}, got {tuple(z.shape)}"
            )
        pads = conv_padding(module)
        for i, size in enumerate(z.shape[-dims:]):
            padded = size + pads[2 * (dims - 1 - i)] + pads[2 * (dims - 1 - i) + 1]
            reach = module.dilation[i] * (module.kernel_size[i] - 1) + 1
            if padded < reach:
                raise ValueError(
                    f"{where}: spatial dimension {i} of the input has size {size} ({padded} after padding), "
                    f"smaller than the dilated kernel ({reach})"
                )
        values = self.parameter_values(params)
        return values.get("weight", module.weight), values.get("bias", module.bias)


# -- dense matrices in O(nonzeros) ----------------------------------------------------------
def _on_distinct_columns(block: Callable[[Tensor | None], Tensor], cols: Tensor | None) -> Tensor:
    """``block(cols)`` for a scatter that maps each input to one column: repeated columns
    are made once and copied."""
    if cols is not None:
        distinct, inverse = torch.unique(cols, return_inverse=True)
        if distinct.shape[0] < cols.shape[0]:
            return block(distinct).index_select(1, inverse)
    return block(cols)


def _block_columns(inputs: Tensor, n: int, cols: Tensor | None) -> tuple[Tensor, int]:
    """Input indices (``n``: a zero of the padding) as columns of the block on ``cols``
    (distinct; ``None``: all ``n``), and its number of columns, which marks an input
    outside the block."""
    if cols is None:
        return inputs, n
    position = torch.full((n + 1,), cols.shape[0], dtype=torch.long, device=inputs.device)
    position[cols] = torch.arange(cols.shape[0], device=inputs.device)
    return position[inputs], cols.shape[0]


def _scattered(target: Tensor, values: Tensor, rows: int, n: int) -> Tensor:
    """The ``rows × n`` matrix with ``values`` added at the flat positions ``target``
    (``rows·n`` for a value that falls on a zero of the padding): one ``index_add`` into
    one fresh buffer, no copies."""
    flat = values.new_zeros(rows * n + 1)
    flat.index_add_(0, target.reshape(-1), values.reshape(-1))
    return flat[:-1].view(rows, n)


def _jacobian_dense(U: Gather, W_bar: Tensor, B: int, L: int, rows: Tensor | None = None,
                    cols: Tensor | None = None) -> Tensor:
    """``F[(b,o,l), j] = Σ_{(c,k): U[(b,l,c,k)] = j} W̄[o, (c,k)]``, or its block on the given
    rows and columns."""
    m, q_w = W_bar.shape
    n = U.shape[1]
    device = W_bar.device
    rows = torch.arange(B * m * L, device=device) if rows is None else rows
    inputs = U.padded.view(B, L, q_w)[rows // (m * L), rows % L]  # (row, (c,k)) → input, n: padding
    inputs, n_cols = _block_columns(inputs, n, cols)
    target = torch.where(inputs < n_cols, torch.arange(rows.shape[0], device=device).unsqueeze(1) * n_cols + inputs,
                         rows.shape[0] * n_cols)
    return _scattered(target, W_bar[(rows // L) % m], rows.shape[0], n_cols)


def _parameter_jacobian_dense(X_tilde: Tensor, J: LinearOperator, m: int, B: int, L: int) -> Tensor:
    """``G = P_out (I_m ⊗ X̃) J`` without multiplying into an identity."""
    R, q = X_tilde.shape
    K = torch.zeros(B, m, L, m, q, dtype=X_tilde.dtype, device=X_tilde.device)
    idx = torch.arange(m, device=X_tilde.device)
    K[:, idx, :, idx, :] = X_tilde.reshape(B, L, q).unsqueeze(0).expand(m, B, L, q)
    K = K.reshape(B * m * L, m * q)
    if isinstance(J, Permutation):
        return K[:, torch.argsort(J.index)]
    return (J.T @ K.mT).mT


def _mixed_dense(U: Gather, Gamma: Tensor, J: LinearOperator, q: int, n: int, rows: Tensor | None = None,
                 cols: Tensor | None = None) -> Tensor:
    """``C = Jᵀ (Γ ⊗ Ẽ) U``: ``C[θ(o,(c,k)), j] = Σ_{r: U[(r,c,k)] = j} Γ[o, r]``, with
    ``θ(o, i)`` the entry of θ that ``J`` puts at ``Θ̃[o, i]`` (none: a structural zero),
    or its block on the given rows (entries of θ) and columns."""
    m, R = Gamma.shape
    q_w = U.shape[0] // R
    p = J.shape[1]
    device = Gamma.device
    # the entry (o, i) of Θ̃ of each row; i = q_w (the bias column), or none: C is zero there
    entry = torch.full((p + 1,), m * q, dtype=torch.long, device=device)
    mapped = J.index >= 0
    entry[J.index[mapped]] = torch.arange(m * q, device=device)[mapped]
    entry = entry[:p] if rows is None else entry[rows]
    n_rows = entry.shape[0]
    o, i = entry // q, entry % q
    weight = (entry < m * q) & (i < q_w)
    inputs = U.padded.view(R, q_w)[:, torch.where(weight, i, 0)].mT  # (row, r) → input, n: padding
    inputs, n_cols = _block_columns(inputs, n, cols)
    keep = weight.unsqueeze(1) & (inputs < n_cols)
    target = torch.where(keep, torch.arange(n_rows, device=device).unsqueeze(1) * n_cols + inputs, n_rows * n_cols)
    return _scattered(target, Gamma[torch.where(weight, o, 0)], n_rows, n_cols)


def _shifted(module: nn.Conv1d | nn.Conv2d, W_bar: Tensor, B: int, spatial: tuple[int, ...],
             gathered: LinearOperator) -> ShiftedConvolution:
    """``F`` of a stride-1 convolution with zero padding as a :class:`ShiftedConvolution`
    (``Conv1d``: height 1)."""
    m, C = module.out_channels, module.in_channels
    if len(module.kernel_size) == 1:
        (left, right), top, bottom = conv_padding(module), 0, 0
        dilation, size, (kh, kw) = (1, module.dilation[0]), (1, spatial[0]), (1, module.kernel_size[0])
    else:
        left, right, top, bottom = conv_padding(module)
        dilation, size, (kh, kw) = tuple(module.dilation), tuple(spatial), module.kernel_size
    return ShiftedConvolution(W_bar.reshape(m, C, kh, kw), B, size, (top, bottom, left, right), dilation, gathered)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _channels_inside(B: int, L: int, m: int, device) -> Tensor:
    """Indices turning the ``(o, b, l)`` order into ``(b, o, l)``."""
    return torch.arange(m * B * L, device=device).reshape(m, B, L).permute(1, 0, 2).reshape(-1)


def _weight_matrix(weight: Tensor, groups: int, channels: int) -> Tensor:
    """``W̄`` (``out × C·K``): each group's weights in its own channel columns, zeros elsewhere."""
    out = weight.shape[0]
    if groups == 1:
        return weight.reshape(out, -1)
    per_out, per_in = out // groups, channels // groups
    K = weight[0, 0].numel()
    W_bar = weight.new_zeros(out, channels * K)
    for gi in range(groups):
        W_bar[gi * per_out:(gi + 1) * per_out, gi * per_in * K:(gi + 1) * per_in * K] = (
            weight[gi * per_out:(gi + 1) * per_out].reshape(per_out, per_in * K)
        )
    return W_bar


@functools.lru_cache(maxsize=128)
def _injection_index(out, channels, groups, K, with_weight, with_bias, device) -> Tensor:
    """For every entry of ``Θ̃`` (``out × q``, row-major) its index in θ, ``−1`` if structurally zero."""
    cols = []
    if with_weight:
        per_out, per_in = out // groups, channels // groups
        o = torch.arange(out, device=device).unsqueeze(1)
        c = torch.arange(channels * K, device=device).unsqueeze(0) // K
        k = torch.arange(channels * K, device=device).unsqueeze(0) % K
        local = c - (o // per_out) * per_in
        inside = (local >= 0) & (local < per_in)
        index = (o * per_in + local) * K + k
        cols.append(torch.where(inside, index, torch.full_like(index, -1)))
    if with_bias:
        first = out * (channels // groups) * K if with_weight else 0
        cols.append(first + torch.arange(out, device=device).unsqueeze(1))
    return torch.cat(cols, dim=1).reshape(-1)


def _theta_injection(module, channels, q_w, with_weight, with_bias, p, z) -> LinearOperator:
    """``J``: θ ↦ ``vec Θ̃``: ``nn.Linear``'s layout (declared, a
    :class:`~tallskinny.blocks.linear.WeightBiasOrder`) for ``groups = 1``, a
    :class:`Permutation` when ``Θ̃`` has no structural zeros otherwise."""
    if module.groups == 1:
        return weight_bias_order(module.out_channels, q_w, with_weight, with_bias, z.dtype, z.device)
    K = q_w // channels
    index = _injection_index(module.out_channels, channels, module.groups, K, with_weight, with_bias, z.device)
    if module.groups == 1 or not with_weight:
        return Permutation(index, dtype=z.dtype)
    return Gather(index, p, dtype=z.dtype, check=False)


register(nn.Conv1d)(ConvBlock)
register(nn.Conv2d)(ConvBlock)
