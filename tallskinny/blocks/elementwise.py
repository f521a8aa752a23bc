"""Elementwise activations ``z_out = σ(z)``: ``F = diag(σ'(z))``, ``E = diag(g ⊙ σ''(z))``.

No parameters (``G``, ``A``, ``C`` are empty). Each rule is a small function returning
``(σ'(z), σ''(z))`` (``None`` for an identically zero ``σ''``). At a kink the
derivative is PyTorch's (ReLU: ``σ'(0) = 0``), so the oracle matches autograd.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import NondeterministicModuleError
from ..linalg import Diagonal, Identity
from .checks import check_adjoint, check_finite, check_input, check_params, plain, zero
from .base import Block
from .protocol import DeferredOracle, Oracle
from .registry import register

__all__ = [
    "DropoutBlock",
    "ElementwiseBlock",
    "GELUBlock",
    "IdentityBlock",
    "ReLUBlock",
    "SiLUBlock",
    "SigmoidBlock",
    "SoftplusBlock",
    "TanhBlock",
    "gelu_derivatives",
    "gelu_tanh_derivatives",
    "relu_derivatives",
    "sigmoid_derivatives",
    "silu_derivatives",
    "softplus_derivatives",
    "tanh_derivatives",
]

Derivatives = tuple[Tensor, "Tensor | None"]


# -- the rules ------------------------------------------------------------------------------
def tanh_derivatives(z: Tensor) -> Derivatives:
    """``tanh' = sech² z = 1/cosh² z``, ``tanh'' = −2t·sech² z`` with ``t = tanh z``
    (``1 − t·t`` loses the digits of a saturated unit: relative error ~eps/sech² z, all of
    them from ``|z| ≈ 19``; ``cosh`` overflows to ``inf`` from ``|z| ≈ 710``, giving 0)."""
    t = torch.tanh(z)
    d1 = torch.cosh(z).pow_(-2)
    return d1, torch.mul(t, d1).mul_(-2)


def relu_derivatives(z: Tensor) -> Derivatives:
    """``relu' = [z > 0]`` (0 at the kink, as PyTorch), ``relu'' = 0``."""
    return (z > 0).to(z.dtype), None


def sigmoid_derivatives(z: Tensor) -> Derivatives:
    """``s' = s(1 − s)``, ``s'' = s(1 − s)(1 − 2s)``, with ``1 − s = s(−z)`` (exact where
    ``s`` rounds to 1)."""
    s, s_minus = torch.sigmoid(z), torch.sigmoid(-z)
    d1 = s * s_minus
    return d1, d1 * (s_minus - s)


def softplus_derivatives(z: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Derivatives:
    """``softplus_β(z) = log(1 + e^{βz})/β``, linear (``= z``) where ``βz > threshold``.

    ``σ' = s(βz)``, ``σ'' = β s(βz) s(−βz)`` on the smooth part; ``1`` and ``0`` on the linear part.
    At ``βz = threshold`` exactly, autograd takes ``σ'`` from the smooth formula but
    ``σ'' = 0``; so do we.
    """
    bz = z * beta
    s = torch.sigmoid(bz)
    d1 = torch.where(bz > threshold, torch.ones_like(z), s)
    d2 = torch.where(bz >= threshold, torch.zeros_like(z), beta * s * torch.sigmoid(-bz))
    return d1, d2


def silu_derivatives(z: Tensor) -> Derivatives:
    """``silu = z s(z)``: ``σ' = s(1 + z(1 − s))``, ``σ'' = s(1 − s)(2 + z(1 − 2s))``, with
    ``1 − s = s(−z)``."""
    s, s_minus = torch.sigmoid(z), torch.sigmoid(-z)
    return s * (1 + z * s_minus), s * s_minus * (2 + z * (s_minus - s))


def gelu_derivatives(z: Tensor) -> Derivatives:
    """``gelu = z Φ(z)``: ``σ' = Φ + zφ``, ``σ'' = φ(2 − z²)``, with ``Φ = erfc(−z/√2)/2``
    (``(1 + erf)/2`` loses the digits of the left tail: 4e-6 relative at z = −7.4)."""
    Phi = 0.5 * torch.erfc(z * (-1 / math.sqrt(2)))
    phi = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return Phi + z * phi, phi * (2 - z * z)


_GELU_KAPPA = 0.044715


def gelu_tanh_derivatives(z: Tensor) -> Derivatives:
    """``gelu ≈ ½ z (1 + tanh u)``, ``u = √(2/π)(z + κz³)``:
    ``σ' = ½(1 + t) + ½ z (1 − t²) u'``, ``σ'' = (1 − t²)(u' − z t u'² + ½ z u'')``.

    ``½(1 ± t) = s(±2u)`` (the logistic ``s``) and ``1 − t² = 4 s(2u) s(−2u)``: exact to
    rounding where ``t`` rounds to ``±1`` (``1 − t·t`` would give 0 for ``|u| ≳ 19``).
    """
    c = math.sqrt(2 / math.pi)
    z2 = z * z
    u2 = (2 * c) * (z + _GELU_KAPPA * z2 * z)
    s_plus, s_minus = torch.sigmoid(u2), torch.sigmoid(-u2)
    du = c * (1 + 3 * _GELU_KAPPA * z2)
    ddu = c * 6 * _GELU_KAPPA * z
    sech2 = 4 * s_plus * s_minus
    d1 = s_plus + 0.5 * z * sech2 * du
    d2 = sech2 * (du - z * (s_plus - s_minus) * du * du + 0.5 * z * ddu)
    return d1, d2


# -- the blocks -----------------------------------------------------------------------------
class ElementwiseBlock(Block):
    """Base of the activation blocks: subclasses give :meth:`function` and :meth:`derivatives`."""

    def function(self, z: Tensor) -> Tensor:
        """``σ(z)``, out of place (``inplace=True`` of the module is ignored)."""
        raise NotImplementedError

    def derivatives(self, z: Tensor) -> Derivatives:
        """``(σ'(z), σ''(z))``; ``None`` for ``σ''`` if it is identically zero."""
        raise NotImplementedError

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        where = self._where("forward")
        check_input(z, where)
        check_params(self.parameters(), params, z, where)
        return self.function(z)

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        z, g = self._checked(z, params, g)
        d1, d2 = self.derivatives(z)
        e = None if not second_order or d2 is None else (g * d2).reshape(-1, 1)
        return _diagonal_oracle(z, d1.reshape(-1, 1), e)

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Kept: ``σ'``, ``σ''·g`` (``2a``); scratch: computed with other blocks, their inputs
        concatenated (``2a``) (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        a = math.prod(z_in) * itemsize
        return 2 * a, 2 * a

    def _checked(self, z, params, g) -> tuple[Tensor, Tensor]:
        """``(z, g)`` after the checks every oracle call makes first."""
        z = self._checked_input(z, params)
        return z, self._checked_adjoint(z, g)

    def _checked_input(self, z, params) -> Tensor:
        where = self._where("oracle")
        check_input(z, where)
        check_params(self.parameters(), params, z, where)
        z = plain(z)
        check_finite(z, "z", where)
        return z

    def _checked_adjoint(self, z: Tensor, g) -> Tensor:
        return plain(check_adjoint(g, z.shape, z, self._where("oracle")))


def _diagonal_oracle(z: Tensor, d: Tensor, e: Tensor | None) -> DeferredOracle:
    """``F = diag(d)``, ``E = diag(e)`` (``a × 1`` columns; ``e = None``: ``E = 0``), the
    operators made on first use."""
    a = z.numel()

    def build() -> Oracle:
        E = zero(a, a, z) if e is None else Diagonal(e.reshape(-1))
        return Oracle(G=zero(a, 0, z), F=Diagonal(d.reshape(-1)), A=zero(0, 0, z), C=zero(0, a, z), E=E)

    return DeferredOracle(build, (a, a, 0), diagonal=(d, e))


def batch_key(block) -> tuple | None:
    """Built-in activation blocks with one key have one derivative rule: their oracles can
    be computed together (:class:`SharedDerivatives`); ``None`` for any other block (a
    subclass may override :meth:`ElementwiseBlock.oracle` or :meth:`~ElementwiseBlock.derivatives`)."""
    key = _BATCH_KEYS.get(type(block))
    return None if key is None else (type(block), *key(block.module))


class SharedDerivatives:
    """``σ'`` and ``σ''`` of blocks of one :func:`batch_key`, the rule applied once to all
    their inputs concatenated (one set of tensor operations for a deep chain's activations).

    The inputs are validated as ``block.oracle`` validates them. ``slopes[k]`` is block
    ``k``'s ``σ'`` (``a × 1``: ``F = diag(σ')`` does not depend on the adjoint, so a backward
    sweep can pass ``g_in = σ' ⊙ g_out`` before any oracle is made); :meth:`oracles` gives
    what each ``block.oracle`` gives, once the adjoints ``g`` of the outputs are known."""

    def __init__(self, blocks: Sequence[ElementwiseBlock], zs: Sequence[Tensor], params: Sequence):
        self.blocks = list(blocks)
        self.zs = [b._checked_input(z, p) for b, z, p in zip(self.blocks, zs, params)]
        self.sizes = [z.numel() for z in self.zs]
        self.d1, self.d2 = self.blocks[0].derivatives(torch.cat([z.reshape(-1) for z in self.zs]).unsqueeze(-1))
        self.slopes = self.d1.split(self.sizes)

    def oracles(self, gs: Sequence[Tensor], *, second_order: bool = True) -> list[Oracle]:
        """The blocks' oracles at the adjoints ``gs`` of their outputs (``E = diag(g ⊙ σ'')``)."""
        gs = [b._checked_adjoint(z, g) for b, z, g in zip(self.blocks, self.zs, gs)]
        if not second_order or self.d2 is None:
            es = [None] * len(self.blocks)
        else:
            es = (self.d2 * torch.cat([g.reshape(-1) for g in gs]).unsqueeze(-1)).split(self.sizes)
        return [_diagonal_oracle(z, d, e) for z, d, e in zip(self.zs, self.slopes, es)]


def oracles_together(blocks: Sequence[ElementwiseBlock], zs, params, gs, *, second_order: bool = True) -> list[Oracle]:
    """The oracles of blocks of one :func:`batch_key`, each what ``block.oracle`` gives
    (validated the same way), the derivative rule applied once (:class:`SharedDerivatives`)."""
    return SharedDerivatives(blocks, zs, params).oracles(gs, second_order=second_order)


@register(nn.Tanh)
class TanhBlock(ElementwiseBlock):
    """``nn.Tanh``."""

    def function(self, z: Tensor) -> Tensor:
        return torch.tanh(z)

    def derivatives(self, z: Tensor) -> Derivatives:
        return tanh_derivatives(z)


@register(nn.ReLU)
class ReLUBlock(ElementwiseBlock):
    """``nn.ReLU`` (``σ'(0) = 0`` as in PyTorch; ``E = 0``)."""

    def function(self, z: Tensor) -> Tensor:
        return torch.relu(z)

    def derivatives(self, z: Tensor) -> Derivatives:
        return relu_derivatives(z)


@register(nn.Sigmoid)
class SigmoidBlock(ElementwiseBlock):
    """``nn.Sigmoid``."""

    def function(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z)

    def derivatives(self, z: Tensor) -> Derivatives:
        return sigmoid_derivatives(z)


@register(nn.Softplus)
class SoftplusBlock(ElementwiseBlock):
    """``nn.Softplus(beta, threshold)``."""

    module: nn.Softplus

    def function(self, z: Tensor) -> Tensor:
        return nn.functional.softplus(z, beta=self.module.beta, threshold=self.module.threshold)

    def derivatives(self, z: Tensor) -> Derivatives:
        return softplus_derivatives(z, self.module.beta, self.module.threshold)


@register(nn.SiLU)
class SiLUBlock(ElementwiseBlock):
    """``nn.SiLU``."""

    def function(self, z: Tensor) -> Tensor:
        return nn.functional.silu(z)

    def derivatives(self, z: Tensor) -> Derivatives:
        return silu_derivatives(z)


@register(nn.GELU)
class GELUBlock(ElementwiseBlock):
    """``nn.GELU`` with ``approximate='none'`` (erf) or ``'tanh'``."""

    module: nn.GELU

    def __init__(self, module: nn.GELU):
        super().__init__(module)
        if module.approximate not in ("none", "tanh"):
            raise ValueError(f"nn.GELU approximate must be 'none' or 'tanh', got {module.approximate!r}")

    def function(self, z: Tensor) -> Tensor:
        """``z·erfc(−z/√2)/2`` and ``z·s(2u)`` (the logistic ``s``): PyTorch's ``1 + erf`` and
        ``1 + tanh u`` cancel in the left tail (relative error ~eps/Φ(z): 3e-4 at z = −7.4,
        which the next layer's ``G`` and the Hessian of its parameters inherit); the same
        values to rounding elsewhere."""
        if self.module.approximate == "tanh":
            u2 = (2 * math.sqrt(2 / math.pi)) * (z + _GELU_KAPPA * z * z * z)
            return z * torch.sigmoid(u2)
        return 0.5 * z * torch.erfc(z * (-1 / math.sqrt(2)))

    def derivatives(self, z: Tensor) -> Derivatives:
        if self.module.approximate == "tanh":
            return gelu_tanh_derivatives(z)
        return gelu_derivatives(z)


@register(nn.Identity)
class IdentityBlock(ElementwiseBlock):
    """``nn.Identity``: ``F = I``, ``E = 0``."""

    def function(self, z: Tensor) -> Tensor:
        return z.view_as(z)  # a new tensor object, like every other block's output

    def derivatives(self, z: Tensor) -> Derivatives:
        return torch.ones_like(z), None

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        z, g = self._checked(z, params, g)
        a = z.numel()
        I = Identity(a, dtype=z.dtype, device=z.device)  # noqa: E741
        return Oracle(G=zero(a, 0, z), F=I, A=zero(0, 0, z), C=zero(0, a, z), E=zero(a, a, z))

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Nothing (``F = I``, ``E = 0``: operators without tensors)."""
        return 0, 0


class DropoutBlock(IdentityBlock):
    """The dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``) in eval mode, where they are the identity.

    In training mode (with ``p > 0``) every call draws a new random mask: the map has no
    derivatives, and ``forward`` and ``oracle`` raise
    :class:`~tallskinny.errors.NondeterministicModuleError`. The flag is read at each call
    (a module may be put in eval mode after the chain is made).
    """

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        self._check_eval("forward")
        return super().forward(z, params)

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        self._check_eval("oracle")
        return super().oracle(z, params, g, second_order=second_order)

    def _check_eval(self, method: str) -> None:
        if self.module.training and self.module.p > 0:
            raise NondeterministicModuleError(
                f"{self._where(method)}: {self.module!r} is in training mode, where each call "
                "draws a new random mask and the map has no derivatives; call .eval() on it "
                "(in eval mode it is the identity)"
            )


for _dropout in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
    register(_dropout)(DropoutBlock)


_BATCH_KEYS = {
    TanhBlock: lambda m: (),
    ReLUBlock: lambda m: (),
    SigmoidBlock: lambda m: (),
    SiLUBlock: lambda m: (),
    SoftplusBlock: lambda m: (m.beta, m.threshold),
    GELUBlock: lambda m: (m.approximate,),
}
