"""Reshaping blocks: a row-major reshape is the identity on flat vectors.

``F = I``, ``E = 0``, no parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..linalg import Identity
from .checks import check_adjoint, check_finite, check_input, check_params, zero
from .base import Block
from .protocol import Oracle
from .registry import register

__all__ = ["FlattenBlock", "ReshapeBlock", "UnflattenBlock"]


class ReshapeBlock(Block):
    """Base of blocks whose output is a row-major reshape of the input; subclasses give :meth:`reshape`."""

    def reshape(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        where = self._where("forward")
        check_input(z, where)
        check_params(self.parameters(), params, z, where)
        out = self.reshape(z)
        return z.view_as(z) if out is z else out  # flatten may return its input itself

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        where = self._where("oracle")
        check_input(z, where)
        check_params(self.parameters(), params, z, where)
        z = z.detach()
        check_finite(z, "z", where)
        out_shape = self.reshape(torch.empty(z.shape, device="meta")).shape
        check_adjoint(g, out_shape, z, where)
        a = z.numel()
        return Oracle(
            G=zero(a, 0, z),
            F=Identity(a, dtype=z.dtype, device=z.device),
            A=zero(0, 0, z),
            C=zero(0, a, z),
            E=zero(a, a, z),
        )

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Nothing (``F = I``, ``E = 0``: operators without tensors)."""
        return 0, 0


@register(nn.Flatten)
class FlattenBlock(ReshapeBlock):
    """``nn.Flatten(start_dim, end_dim)``."""

    module: nn.Flatten

    def reshape(self, z: Tensor) -> Tensor:
        return z.flatten(self.module.start_dim, self.module.end_dim)


@register(nn.Unflatten)
class UnflattenBlock(ReshapeBlock):
    """``nn.Unflatten(dim, unflattened_size)``."""

    module: nn.Unflatten

    def reshape(self, z: Tensor) -> Tensor:
        return z.unflatten(self.module.dim, self.module.unflattened_size)
