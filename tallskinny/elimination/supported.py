"""A value Hessian that is zero outside some rows and columns (dead ReLU units).

A dense stage next to ReLUs computes the new value Hessian ``S`` on the live inputs
only: ``S`` is exactly zero on the others. :class:`Supported` keeps it as that block and
its index, so the ReLU stage before it scales the block (``S ⊙ ddᵀ``) and the next dense
stage reads it as its live block, with no ``a × a`` matrix embedded in zeros between them.
Stages that do not declare ``takes_supported`` get the dense matrix (:func:`dense`).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor


@attrs.frozen
class Supported:
    """The symmetric ``n × n`` matrix with ``values`` (``k × k``) on the rows and columns
    ``index`` (``k`` distinct indices, increasing) and zeros elsewhere."""

    values: Tensor
    index: Tensor
    n: int

    def dense(self) -> Tensor:
        out = self.values.new_zeros(self.n, self.n)
        out[self.index.unsqueeze(1), self.index] = self.values
        return out

    def block(self, index: Tensor) -> Tensor:
        """The block on the rows and columns ``index`` (increasing): ``values`` itself
        where the indices are the same."""
        if index.shape == self.index.shape and torch.equal(index, self.index):
            return self.values
        position = torch.full((self.n,), -1, dtype=torch.long, device=index.device)
        position[self.index] = torch.arange(self.index.shape[0], device=index.device)
        where = position[index]
        inside = where >= 0
        out = self.values.new_zeros(index.shape[0], index.shape[0])
        kept = inside.nonzero().squeeze(1)
        out[kept.unsqueeze(1), kept] = self.values[where[kept].unsqueeze(1), where[kept]]
        return out


def dense(S: Tensor | Supported) -> Tensor:
    """``S`` as a dense tensor."""
    return S.dense() if isinstance(S, Supported) else S


def buffer(S: Tensor | Supported) -> Tensor:
    """The tensor that holds ``S``'s values."""
    return S.values if isinstance(S, Supported) else S


__all__ = ["Supported", "buffer", "dense"]
