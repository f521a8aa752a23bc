"""``nn.Linear``: ``z_out[s, k] = Σ_j W[k, j] z[s, j] + b[k]`` for every sample ``s``.

All leading dimensions of the input ``(*, in)`` are samples (``S`` in all). With
θ = ``[vec(W) row-major, b]`` (only the parts that require grad):

* ``G[(s,k), (k',j)] = δ(k,k') z[s,j]`` and ``G[(s,k), b_k'] = δ(k,k')``,
* ``F = I_S ⊗ W``,
* ``C[(k,j), (s,j')] = g[s,k] δ(j,j')`` (only the rows of ``W``), ``A = 0``, ``E = 0``.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..linalg import Dense, Identity, LinearOperator
from ..linalg.kronecker import Kronecker, Permutation, Product, padded_identity_matrix, transpose_permutation
from .checks import check_adjoint, check_finite, check_input, check_params, plain, zero
from .base import Block
from .protocol import DeferredOracle, Oracle
from .registry import register

__all__ = ["LinearBlock", "WeightBiasOrder", "linear_C", "linear_F", "linear_G", "weight_bias_order"]


@register(nn.Linear)
class LinearBlock(Block):
    """Analytic block of ``nn.Linear`` (with or without bias, any number of sample dims)."""

    module: nn.Linear

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        weight, bias = self._weight_bias(z, params, "forward")
        return nn.functional.linear(z, weight, bias)

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        where = self._where("oracle")
        weight, bias = self._weight_bias(z, params, "oracle")
        z = plain(z)
        check_finite(z, "z", where)
        out_features, in_features = weight.shape
        g = plain(check_adjoint(g, z.shape[:-1] + (out_features,), z, where))
        z2 = z.reshape(-1, in_features)
        trainable = self._names
        with_weight, with_bias = "weight" in trainable, bias is not None and "bias" in trainable
        if z2.shape[0] == 1 and with_weight:
            # one sample, θ = [vec(W), b] or vec(W): the operators are made on first use;
            # the batched runs read (W, x, g) only (and the bias from p)
            W, g2 = plain(weight), g.reshape(1, out_features)
            sizes = (in_features, out_features, out_features * (in_features + with_bias))
            return DeferredOracle(
                lambda: self._oracle(z2, W, g2, second_order, with_weight, with_bias),
                sizes,
                linear=(W, z2.mT, g2.mT if second_order else None),
            )
        return self._oracle(z2, plain(weight), g.reshape(-1, out_features), second_order, with_weight, with_bias)

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Kept: ``X̃ = [x | 1]`` (``R × q``), the padded identity ``Ẽ`` of ``C`` (``q × in``)
        and the permutations' int64 indices (``out·(R + 3q)``); no scratch
        (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        out_features, in_features = self.module.weight.shape
        R = math.prod(z_in) // max(in_features, 1)
        q = in_features + 1
        C = q * in_features if second_order and "weight" in self._names else 0
        return (R * q + C) * itemsize + 8 * out_features * (R + 3 * q), 0

    def _oracle(self, z2, weight, g2, second_order, with_weight=True, with_bias=True) -> Oracle:
        out_features, in_features = weight.shape
        G = linear_G(z2, out_features, with_weight=with_weight, with_bias=with_bias)
        F = linear_F(weight, z2.shape[0])
        p, a_in = G.shape[1], z2.numel()
        if not second_order or not with_weight:
            C = zero(p, a_in, z2)
        else:
            C = linear_C(g2, in_features, with_bias=with_bias)
        return Oracle(G=G, F=F, A=zero(p, p, z2), C=C, E=zero(a_in, a_in, z2))

    def _weight_bias(self, z, params, method: str) -> tuple[Tensor, Tensor | None]:
        where = self._where(method)
        check_input(z, where)
        params = check_params(self._parameters, params, z, where)
        if len(params) == 2 and self._names == ["weight", "bias"]:  # both trainable (the common case)
            weight, bias = params
        else:
            values = self.parameter_values(params)
            weight, bias = values.get("weight", self.module.weight), values.get("bias", self.module.bias)
        if z.dim() == 0 or z.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{where}: the input must have shape (*, {weight.shape[1]}) (in_features last), "
                f"got {tuple(z.shape)}"
            )
        return weight, bias


def linear_G(z2: Tensor, out_features: int, *, with_weight: bool, with_bias: bool) -> LinearOperator:
    """``∂z_out/∂θ`` for inputs ``z2`` of shape ``(S, in)``, with its structure.

    With ``Θ̃ = [W | b]`` (the trainable parts, ``out × q``) and ``X̃ = [z2 | 1]``
    (``S × q``), the output is ``Θ̃ X̃ᵀ`` read sample-major, so
    ``G = P_out (I_out ⊗ X̃) P_θ`` where ``P_θ`` orders θ as ``vec(Θ̃)`` and ``P_out``
    turns the ``out × S`` result into ``S × out``.
    """
    S, in_features = z2.shape
    if not (with_weight or with_bias):
        return zero(S * out_features, 0, z2)
    columns = ([z2] if with_weight else []) + ([z2.new_ones(S, 1)] if with_bias else [])
    X = torch.cat(columns, dim=1)
    return Product(
        _output_order(out_features, S, z2.dtype, z2.device),
        Kronecker(Identity(out_features, dtype=z2.dtype, device=z2.device), Dense(X)),
        weight_bias_order(out_features, in_features, with_weight, with_bias, z2.dtype, z2.device),
    )


def linear_F(weight: Tensor, samples: int) -> LinearOperator:
    """``∂z_out/∂z_in = I_S ⊗ W``."""
    return Kronecker(Identity(samples, dtype=weight.dtype, device=weight.device), Dense(weight))


def linear_C(g2: Tensor, in_features: int, *, with_bias: bool) -> LinearOperator:
    """``Σ g ∂²z_out/∂θ∂z_in`` for adjoints ``g2`` of shape ``(S, out)``:
    ``C[(k,j),(s,j')] = g[s,k] δ(j,j')``, i.e. ``θᵀ C y = ⟨W, Gᵀ Y⟩``; as an operator
    ``C = P_θᵀ (g2ᵀ ⊗ Ẽ)`` with ``Ẽ = [I_in; 0]`` (no bias row is touched)."""
    S, out_features = g2.shape
    E_tilde = padded_identity_matrix(in_features + int(with_bias), in_features, g2.dtype, g2.device)
    P_theta = weight_bias_order(out_features, in_features, True, with_bias, g2.dtype, g2.device)
    return Product(P_theta.T, Kronecker(Dense(g2.mT), Dense(E_tilde)))


@functools.lru_cache(maxsize=256)
def _output_order(out_features: int, samples: int, dtype, device) -> Permutation:
    """``P_out``: the ``out × S`` product read sample-major (cached: made once per shape)."""
    return Permutation(transpose_permutation(out_features, samples, device=device), dtype=dtype)


class WeightBiasOrder(Permutation):
    """``P_θ`` of a block with θ = ``[vec(W), b]`` and ``Θ̃ = [W | b]`` (``nn.Linear``'s layout;
    a convolution's with ``groups = 1``): ``vec(Θ̃) = P_θ θ``, with the layout it stands for
    declared: ``weight_columns`` (``n_w``, 0 without a trainable weight) and ``bias``.

    The layout is declared, not read off the permutation: with one output unit the index
    orders of "``n`` weight columns and a bias" and "``n + 1`` weight columns" coincide."""

    def __init__(self, out_features: int, weight_columns: int, bias: bool, *, dtype, device):
        index = _theta_order(out_features, weight_columns, weight_columns > 0, bias, device)
        super().__init__(index, dtype=dtype)
        self.out_features, self.weight_columns, self.bias = out_features, weight_columns, bias

    def astype(self, dtype: torch.dtype) -> "WeightBiasOrder":
        if dtype == self.dtype:
            return self
        columns = self.weight_columns
        return weight_bias_order(self.out_features, columns, columns > 0, self.bias, dtype, self.device)


@functools.lru_cache(maxsize=256)
def weight_bias_order(out_features, in_features, with_weight, with_bias, dtype, device) -> WeightBiasOrder:
    """``P_θ`` of ``nn.Linear``'s layout (cached: made once per shape)."""
    return WeightBiasOrder(out_features, in_features if with_weight else 0, with_bias, dtype=dtype, device=device)


def _theta_order(out_features: int, in_features: int, with_weight: bool, with_bias: bool, device) -> Tensor:
    """Indices ``i`` with ``vec(Θ̃) = θ[i]`` for ``θ = [vec(W), b]`` and ``Θ̃ = [W | b]``."""
    q = in_features * with_weight + with_bias
    idx = torch.empty(out_features, q, dtype=torch.long, device=device)
    if with_weight:
        idx[:, :in_features] = torch.arange(out_features * in_features, device=device).reshape(out_features, in_features)
    if with_bias:
        idx[:, -1] = out_features * in_features * with_weight + torch.arange(out_features, device=device)
    return idx.reshape(-1)
