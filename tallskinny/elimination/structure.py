"""Structure detection: whether a block's oracle is affine in its parameters, and the
parts ``(P_out, X̃, P_θ, Γ, Ẽ)`` of ``G = P_out (I_m ⊗ X̃) P_θ``, ``C = P_θᵀ (Γ ⊗ Ẽ)``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks.protocol import Oracle
from ..linalg import Dense, ScaledIdentity, Zero
from ..linalg.kronecker import Kronecker, Permutation, Product, padded_identity_matrix, transpose_permutation


def affine_parts(o: Oracle):
    """``(p_out, X̃, p_θ, Γ, Ẽ, C)`` if ``G`` has the affine structure and ``A = 0``, else
    ``None``. ``Γ``, ``Ẽ`` describe ``C = P_θᵀ(Γ ⊗ Ẽ)`` where it has that form (``None``
    otherwise); the last entry is ``C`` itself where it is neither zero nor of that form
    (a convolution's ``C`` ends with the unfold of its input), used densely."""
    G = o.G
    if not isinstance(o.A, Zero) or not isinstance(G, Product) or len(G.factors) != 3:
        return None
    p_out, kron, p_theta = G.factors
    if not (
        isinstance(p_out, Permutation)
        and isinstance(p_theta, Permutation)
        and isinstance(kron, Kronecker)
        and isinstance(kron.left, ScaledIdentity)
        and kron.left.scale == 1.0
        and isinstance(kron.right, Dense)
    ):
        return None
    if isinstance(o.C, Zero):
        return p_out.index, kron.right.matrix, p_theta, None, None, None
    C = o.C
    if not (
        isinstance(C, Product)
        and len(C.factors) == 2
        and isinstance(C.factors[0], Permutation)
        and (C.factors[0] is p_theta.T or torch.equal(C.factors[0].index, p_theta.T.index))
        and isinstance(C.factors[1], Kronecker)
        and isinstance(C.factors[1].left, Dense)
        and isinstance(C.factors[1].right, Dense)
    ):
        return p_out.index, kron.right.matrix, p_theta, None, None, C
    return p_out.index, kron.right.matrix, p_theta, C.factors[1].left.matrix, C.factors[1].right.matrix, None


def samples_first(o: Oracle, parts) -> bool:
    """Whether the output is ordered sample-major, ``(s, i)``: ``P_out`` is the transpose
    of the ``m × R`` product (as for ``nn.Linear``), which :class:`~tallskinny.elimination.stages.affine.AffineStage` assumes."""
    p_out, X = parts[0], parts[1]
    R = X.shape[0]
    m = o.G.shape[0] // R
    expected = transpose_permutation(m, R, device=p_out.device)
    return p_out is expected or torch.equal(p_out, expected)


def channels_first(parts) -> bool:
    """Whether the output is ordered channel-major over several rows, ``(i, s)``: ``P_out``
    is the identity and ``X̃`` has more than one row (a convolution at one sample)."""
    p_out, X = parts[0], parts[1]
    return X.shape[0] > 1 and torch.equal(p_out, torch.arange(p_out.shape[0], device=p_out.device))


def transposed_order(p_theta: Permutation, m: int, q: int) -> tuple[Tensor, Tensor]:
    """The gather indices of ``vec(Θ̃ᵀ)`` from θ and their inverse (kept by the
    permutation, which blocks make once per shape)."""
    return p_theta.transposed_order(m, q)


def padded_identity(Et: Tensor | None) -> bool:
    """Whether ``Ẽ = [I; 0]`` (a Linear layer's input padded by the bias column)."""
    if Et is None or Et.shape[0] < Et.shape[1]:
        return False
    expected = padded_identity_matrix(*Et.shape, Et.dtype, Et.device)
    return Et is expected or torch.equal(Et, expected)
