"""Pooling: piecewise linear maps of each (sample, channel) plane, ``E = 0``, no parameters.

* ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d``: linear, the same averaging matrix
  ``P`` (``L_out × L_in``) on every plane, so ``F = I_planes ⊗ P``. ``P`` is read off by
  applying the module to the unit vectors of one plane (divisors, padding and
  ``ceil_mode`` as PyTorch computes them).
* ``nn.MaxPool1d/2d``: ``F`` selects, for every output, the input entry PyTorch's
  ``max_pool`` returns as its index (a :class:`~tallskinny_conv.operators.Gather`):
  this is the derivative autograd uses, ties included. ``return_indices=True`` is
  refused (the module would return a tuple).
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as Fn

from tallskinny.blocks import Block, Oracle, register
from tallskinny.blocks.checks import check_adjoint, check_finite, check_input, check_params
from tallskinny.linalg import Dense, Identity, LinearOperator, Zero
from tallskinny.linalg.kronecker import Kronecker

from .operators import Gather

__all__ = ["AvgPoolBlock", "MaxPoolBlock", "PoolBlock"]


class PoolBlock(Block):
    """Base of the pooling blocks: ``dims`` spatial dims (the last ones), one plane each."""

    dims: int

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        self._check(z, params, "forward")
        return self.module(z)

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        where = self._where("oracle")
        self._check(z, params, "oracle")
        z = z.detach()
        check_finite(z, "z", where)
        with torch.no_grad():
            out = self.module(z)
        check_adjoint(g, out.shape, z, where)
        a_in, a_out = z.numel(), out.numel()
        kw = dict(dtype=z.dtype, device=z.device)
        return Oracle(G=Zero(a_out, 0, **kw), F=self.jacobian(z), A=Zero(0, 0, **kw), C=Zero(0, a_in, **kw),
                      E=Zero(a_in, a_in, **kw))

    def jacobian(self, z: Tensor) -> LinearOperator:
        raise NotImplementedError

    def _check(self, z, params, method: str) -> None:
        where = self._where(method)
        check_input(z, where)
        check_params(self.parameters(), params, z, where)
        if z.dim() not in (self.dims + 1, self.dims + 2):
            raise ValueError(
                f"{where}: the input must have {self.dims + 2} dims (N, C, spatial…) or {self.dims + 1} "
                f"(C, spatial…), got shape {tuple(z.shape)}"
            )


class AvgPoolBlock(PoolBlock):
    """``F = I_planes ⊗ P``: the same averaging matrix on every (sample, channel) plane."""

    def jacobian(self, z: Tensor) -> LinearOperator:
        spatial = z.shape[-self.dims:]
        n = spatial.numel()
        basis = torch.eye(n, dtype=z.dtype, device=z.device).reshape(n, 1, *spatial)
        with torch.no_grad():
            P = self.module(basis).reshape(n, -1).mT.contiguous()  # L_out × L_in
        planes = z.numel() // n
        return Kronecker(Identity(planes, dtype=z.dtype, device=z.device), Dense(P))

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Kept: ``P`` (``L_out × n``, ``n`` the entries of one plane); scratch: the unit
        vectors of one plane (``n × n``) and their image."""
        n = math.prod(z_in[-self.dims:])
        L_out = math.prod(z_out[-self.dims:])
        return n * L_out * itemsize, (n * n + n * L_out) * itemsize


class MaxPoolBlock(PoolBlock):
    """``F`` = the selection of the entries ``max_pool`` returns as indices."""

    module: nn.MaxPool1d | nn.MaxPool2d

    def __init__(self, module):
        if getattr(module, "return_indices", False):
            raise TypeError(
                f"{module!r} has return_indices=True and returns a tuple; a block maps one tensor to one "
                "tensor (use return_indices=False in the chain)"
            )
        super().__init__(module)

    def jacobian(self, z: Tensor) -> LinearOperator:
        m = self.module
        spatial = z.shape[-self.dims:]
        n = spatial.numel()
        planes = z.reshape(-1, 1, *spatial)
        pool = Fn.max_pool1d if self.dims == 1 else Fn.max_pool2d
        with torch.no_grad():
            _, index = pool(planes, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                            return_indices=True)
        offsets = (torch.arange(planes.shape[0], device=z.device) * n).reshape(-1, *([1] * (index.dim() - 1)))
        return Gather((index + offsets).reshape(-1), z.numel(), dtype=z.dtype, check=False)

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """The selected indices (int64): the gather's two kept, the pool's and their offsets."""
        a = math.prod(z_out)
        return 8 * 2 * a, 8 * 2 * a


def _pool_class(base: type, dims: int, name: str) -> type:
    cls = type(name, (base,), {"dims": dims, "__doc__": f"{base.__doc__} ({dims}-D)"})
    cls.__module__ = __name__
    return cls


AvgPool1dBlock = register(nn.AvgPool1d)(_pool_class(AvgPoolBlock, 1, "AvgPool1dBlock"))
AvgPool2dBlock = register(nn.AvgPool2d)(_pool_class(AvgPoolBlock, 2, "AvgPool2dBlock"))
AdaptiveAvgPool1dBlock = register(nn.AdaptiveAvgPool1d)(_pool_class(AvgPoolBlock, 1, "AdaptiveAvgPool1dBlock"))
AdaptiveAvgPool2dBlock = register(nn.AdaptiveAvgPool2d)(_pool_class(AvgPoolBlock, 2, "AdaptiveAvgPool2dBlock"))
MaxPool1dBlock = register(nn.MaxPool1d)(_pool_class(MaxPoolBlock, 1, "MaxPool1dBlock"))
MaxPool2dBlock = register(nn.MaxPool2d)(_pool_class(MaxPoolBlock, 2, "MaxPool2dBlock"))
