"""Parameter-space vectors: the flat ``(P,)``/``(P, k)`` format and the per-parameter format.

A vector over the parameters ``θ = (θ_1, …, θ_n)`` of a chain is either one flat tensor
``(P,)`` or ``(P, k)`` (``k`` right-hand sides; entries in ``chain.parameters()`` order,
each parameter flattened row-major), or a list/tuple of tensors shaped like the
parameters, optionally with a trailing ``k``. Results come back in the format given.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import torch
from torch import Tensor


@attrs.frozen
class VectorFormat:
    """How a user's vector was given, so a result can be returned the same way."""

    as_list: bool
    container: type | None
    k: int | None  # None: one vector without a trailing k axis


@attrs.frozen
class ParameterLayout:
    """Shapes, names, dtype and device of the parameters of a chain, in order."""

    shapes: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def to_flat(self, v, what: str = "vector") -> tuple[Tensor, VectorFormat]:
        """Validate ``v`` and return it as a ``(P, k)`` tensor with its format.

        ``v`` must be finite (``ValueError`` naming ``what`` and the parameter). Its
        autograd history is dropped: results computed from it carry no graph."""
        if isinstance(v, Tensor):
            self._check_tensor(v, what, "")
            P = self.numel
            if v.dim() not in (1, 2) or v.shape[0] != P:
                raise ValueError(
                    f"{what} must have shape ({P},) or ({P}, k) for the {P} parameters "
                    f"of the chain, or be a list of tensors shaped like the parameters; "
                    f"got a tensor of shape {tuple(v.shape)}"
                )
            fmt = VectorFormat(as_list=False, container=None, k=v.shape[1] if v.dim() == 2 else None)
            x = v if v.dim() == 2 else v.unsqueeze(1)
        elif isinstance(v, (list, tuple)):
            x, fmt = self._list_to_flat(v, what)
        else:
            raise TypeError(
                f"{what} must be a tensor or a list/tuple of tensors, got {type(v).__name__}"
            )
        # the products write into buffers (out=), which autograd refuses
        x = x.detach() if x.requires_grad else x
        self._check_finite(x, what, fmt)
        return x, fmt

    def from_flat(self, x: Tensor, fmt: VectorFormat):
        """The inverse of :meth:`to_flat` for a ``(P, k)`` result."""
        if not fmt.as_list:
            return x if fmt.k is not None else x.squeeze(1)
        parts = []
        for piece, shape in zip(torch.split(x, self.sizes, dim=0), self.shapes):
            parts.append(piece.reshape(*shape, x.shape[1]) if fmt.k is not None else piece.reshape(shape))
        return fmt.container(parts)

    def split(self, x: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat ``(P, ...)`` tensor."""
        return list(torch.split(x, self.sizes, dim=0))

    # -- validation ---------------------------------------------------------------------
    def _check_finite(self, x: Tensor, what: str, fmt: VectorFormat) -> None:
        """No NaN or inf in the flat ``(P, k)`` ``x`` (a finite sum has no inf or NaN terms:
        one reduction; the elementwise test only where the sum is not finite)."""
        if bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all()):
            return
        for i, (piece, name) in enumerate(zip(self.split(x), self.names)):
            if not bool(torch.isfinite(piece).all()):
                where = f"{what}[{i}] (parameter {name!r})" if fmt.as_list else f"{what}, at parameter {name!r},"
                raise ValueError(f"{where} contains NaN or inf; a parameter-space vector must be finite")

    def _check_tensor(self, t: Tensor, what: str, where: str) -> None:
        if t.dtype != self.dtype:
            raise TypeError(
                f"{what}{where} has dtype {t.dtype}, but the parameters are {self.dtype}"
            )
        if t.device != self.device:
            raise ValueError(
                f"{what}{where} is on device {t.device}, but the parameters are on {self.device}"
            )

    def _list_to_flat(self, v: Sequence, what: str) -> tuple[Tensor, VectorFormat]:
        n = len(self.shapes)
        if len(v) != n:
            raise ValueError(f"{what} is a list of {len(v)} tensors, but the chain has {n} parameters")
        k: int | None = None
        flat = []
        for i, (t, shape, name) in enumerate(zip(v, self.shapes, self.names)):
            where = f"[{i}] (parameter {name!r})"
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}{where} must be a tensor, got {type(t).__name__}")
            self._check_tensor(t, what, where)
            if tuple(t.shape) == shape:
                this_k = None
            elif t.dim() == len(shape) + 1 and tuple(t.shape[:-1]) == shape:
                this_k = t.shape[-1]
            else:
                raise ValueError(
                    f"{what}{where} has shape {tuple(t.shape)}; expected {shape} "
                    f"(or {shape + ('k',)} for k right-hand sides)"
                )
            if i == 0:
                k = this_k
            elif this_k != k:
                raise ValueError(
                    f"{what}{where}: inconsistent trailing dimension (right-hand sides): "
                    f"{this_k} here, {k} in {what}[0]"
                )
            flat.append(t.reshape(math.prod(shape), 1 if this_k is None else this_k))
        x = torch.cat(flat, dim=0) if flat else torch.zeros(0, 1, dtype=self.dtype, device=self.device)
        return x, VectorFormat(as_list=True, container=type(v) if type(v) in (list, tuple) else list, k=k)


def gaussian(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device) -> Tensor:
    """A reproducible standard normal tensor (its own generator, seeded; drawn on the CPU),
    for the probes and start vectors of checks and iterations, whose statistics are all
    that matters: drawn in float32 and cast (float64 draws cost 4–5× as much)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
