"""``nn.LayerNorm``: ``y = γ ⊙ x̂ + β`` with ``x̂ = (x − μ)/√(v + eps)`` per sample.

A *sample* ``s`` is one row of the last ``D = prod(normalized_shape)`` entries (all
leading dimensions are samples, ``S`` in all). With ``c = x_s − μ_s 1`` (``μ_s`` the
mean), ``v_s = cᵀc/D``, ``r_s = (v_s + eps)^{-1/2}``, ``x̂_s = r_s c`` and the centring
projector ``P = I − 11ᵀ/D``:

* ``N_s = ∂x̂_s/∂x_s = r_s (P − x̂_s x̂_sᵀ/D)`` (symmetric);
* ``F = blockdiag_s(diag(γ) N_s)``;
* ``G[(s,i), γ_j] = δ_ij x̂_si``, ``G[(s,i), β_j] = δ_ij`` (θ = ``[γ, β]``, the parts
  that require grad);
* ``A = 0`` (the output is affine in θ);
* ``C[γ_j, (s,i)] = g_sj N_s[j, i]`` (``C = 0`` in the rows of ``β``);
* ``E = blockdiag_s E_s`` with ``h = γ ⊙ g_s``, ``h̄ = P h``, ``α = hᵀx̂_s``:
  ``E_s = (r_s²/D) [ −(h̄ x̂_sᵀ + x̂_s h̄ᵀ) + (3α/D) x̂_s x̂_sᵀ − α P ]``
  (the Hessian of ``x ↦ hᵀ x̂(x)``).

Without ``elementwise_affine`` ``γ = 1`` and there are no parameters.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..linalg import BlockDiagonal, Dense, LinearOperator
from .checks import check_input, check_params, zero
from .base import Block
from .protocol import Oracle
from .registry import register

__all__ = ["LayerNormBlock", "layer_norm_parts"]


@register(nn.LayerNorm)
class LayerNormBlock(Block):
    """Analytic block of ``nn.LayerNorm`` (any ``normalized_shape``, with or without
    ``elementwise_affine`` and ``bias``; frozen parameters are constants)."""

    module: nn.LayerNorm

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        weight, bias = self._weight_bias(z, params, "forward")
        return nn.functional.layer_norm(z, self.module.normalized_shape, weight, bias, self.module.eps)

    def checked_parameters(self, z: Tensor, params: Sequence[Tensor], where: str):
        return self._weight_bias(z, params, "oracle")

    def output_shape(self, z: Tensor, values) -> tuple[int, ...]:
        return tuple(z.shape)

    def compute_oracle(self, z: Tensor, values, g: Tensor, *, second_order: bool = True) -> Oracle:
        weight, _ = values
        D = math.prod(self.module.normalized_shape)
        x = z.reshape(-1, D)
        S = x.shape[0]
        gamma = weight.detach().reshape(-1) if weight is not None else x.new_ones(D)
        x_hat, r, N = layer_norm_parts(x, self.module.eps)
        trainable = set(self.parameter_names())
        with_weight, with_bias = "weight" in trainable, "bias" in trainable
        a = z.numel()

        F = _block_diagonal(gamma.unsqueeze(-1) * N)
        columns = []
        if with_weight:
            columns.append(torch.diag_embed(x_hat).reshape(a, D))
        if with_bias:
            columns.append(torch.eye(D, dtype=z.dtype, device=z.device).repeat(S, 1))
        p = D * len(columns)
        G = Dense(torch.cat(columns, dim=1)) if columns else zero(a, 0, z)
        if not second_order:
            return Oracle(G=G, F=F, A=zero(p, p, z), C=zero(p, a, z), E=zero(a, a, z))

        g2 = g.reshape(S, D)
        if with_weight:
            C_gamma = (g2.unsqueeze(-1) * N).permute(1, 0, 2).reshape(D, a)  # [j, (s, i)] = g_sj N_s[j, i]
            rows = [C_gamma] + ([z.new_zeros(D, a)] if with_bias else [])
            C: LinearOperator = Dense(torch.cat(rows, dim=0))
        else:
            C = zero(p, a, z)
        E = _block_diagonal(_layer_norm_curvature(x_hat, r, gamma * g2), symmetric=True)
        return Oracle(G=G, F=F, A=zero(p, p, z), C=C, E=E)

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """``S`` blocks ``D × D`` (``a·D`` in all) for ``F`` and ``E``, the ``a × D`` columns
        of ``G`` and rows of ``C``: ``7·a·D`` kept, ``9·a·D`` of temporaries besides
        (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        aD = math.prod(z_in) * math.prod(self.module.normalized_shape) * itemsize
        return 7 * aD, 9 * aD

    def _weight_bias(self, z, params, method: str) -> tuple[Tensor | None, Tensor | None]:
        where = self._where(method)
        check_input(z, where)
        params = check_params(self.parameters(), params, z, where)
        shape = tuple(self.module.normalized_shape)
        if z.dim() < len(shape) or tuple(z.shape[z.dim() - len(shape):]) != shape:
            raise ValueError(
                f"{where}: the input must have shape (*, {', '.join(map(str, shape))}) "
                f"(normalized_shape last), got {tuple(z.shape)}"
            )
        values = self.parameter_values(params)
        return values.get("weight", self.module.weight), values.get("bias", self.module.bias)


def layer_norm_parts(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """For rows ``x`` (``S × D``): ``x̂`` (``S × D``), ``r = (v + eps)^{-1/2}`` (``S``) and
    ``N = ∂x̂/∂x = r (P − x̂x̂ᵀ/D)`` (``S × D × D``)."""
    S, D = x.shape
    c = x - x.mean(dim=1, keepdim=True)
    var = (c * c).mean(dim=1)
    r = torch.rsqrt(var + eps)
    x_hat = c * r.unsqueeze(-1)
    P = torch.eye(D, dtype=x.dtype, device=x.device) - 1.0 / D
    N = r[:, None, None] * (P - x_hat.unsqueeze(-1) * x_hat.unsqueeze(-2) / D)
    return x_hat, r, N


def _layer_norm_curvature(x_hat: Tensor, r: Tensor, h: Tensor) -> Tensor:
    """``E_s = (r²/D)[−(h̄x̂ᵀ + x̂h̄ᵀ) + (3α/D) x̂x̂ᵀ − αP]`` for every row (``S × D × D``)."""
    S, D = x_hat.shape
    h_bar = h - h.mean(dim=1, keepdim=True)
    alpha = (h * x_hat).sum(dim=1)
    P = torch.eye(D, dtype=x_hat.dtype, device=x_hat.device) - 1.0 / D
    outer = h_bar.unsqueeze(-1) * x_hat.unsqueeze(-2)
    E = -(outer + outer.mT)
    E = E + (3 * alpha / D)[:, None, None] * (x_hat.unsqueeze(-1) * x_hat.unsqueeze(-2))
    E = E - alpha[:, None, None] * P
    return (r * r / D)[:, None, None] * E


def _block_diagonal(blocks: Tensor, *, symmetric: bool = False) -> LinearOperator:
    """``blockdiag`` of ``S`` dense ``D × D`` blocks (one :class:`Dense` if ``S = 1``)."""
    if blocks.shape[0] == 1:
        return Dense(blocks[0], symmetric=symmetric)
    return BlockDiagonal([Dense(b, symmetric=symmetric) for b in blocks])
