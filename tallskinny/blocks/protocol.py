"""What a block must provide so that a chain can use it.

A block is one map ``z_out = f(z_in; θ)`` of a chain. Tensors keep their natural shapes
(the batch included) when they flow through ``forward``; derivatives act on *flat*
vectors: ``z_in`` flattened row-major (length ``a_in = z_in.numel()``), ``z_out``
flattened (``a_out``), and ``θ`` the row-major flattenings of the block's parameters
concatenated in order (length ``p``).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import attrs
import torch
from torch import Tensor

from ..linalg import LinearOperator


@attrs.frozen
class Oracle:
    """The derivatives of one block at a point, contracted with ``g = ∂loss/∂z_out``.

    ====  ========================================  =================
    name  meaning                                   shape
    ====  ========================================  =================
    G     ∂z_out/∂θ                                 a_out × p
    F     ∂z_out/∂z_in                              a_out × a_in
    A     Σ_k g_k ∂²z_out,k/∂θ∂θ                    p × p
    C     Σ_k g_k ∂²z_out,k/∂θ∂z_in                 p × a_in
    E     Σ_k g_k ∂²z_out,k/∂z_in∂z_in              a_in × a_in
    ====  ========================================  =================

    Each is a :class:`tallskinny.linalg.LinearOperator` (``Dense``, ``Zero``,
    ``Diagonal``, ``BlockDiagonal``, …); the solver exploits whatever structure it is
    given. For a loss block ``a_out = 1``, ``p = 0`` and ``g = 1``: ``F`` is the
    gradient of the loss as a ``1 × a_in`` row and ``E`` its Hessian.
    """

    G: LinearOperator
    F: LinearOperator
    A: LinearOperator
    C: LinearOperator
    E: LinearOperator

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(a_in, a_out, p)``."""
        return self.F.shape[1], self.F.shape[0], self.G.shape[1]

    def astype(self, dtype: torch.dtype) -> "Oracle":
        """The same oracle with every operator in ``dtype`` (structure kept)."""
        return Oracle(
            G=self.G.astype(dtype), F=self.F.astype(dtype), A=self.A.astype(dtype), C=self.C.astype(dtype),
            E=self.E.astype(dtype),
        )


class DeferredOracle(Oracle):
    """An :class:`Oracle` whose operators are made on first access, with what the solver's
    fast paths read of it given at once.

    Deep chains of small layers spend much of a curvature's time building operator objects
    that batched runs never read (:mod:`tallskinny.elimination.stages.run`). A block may return
    this instead (after all its input checks): ``build()`` returns the full
    :class:`Oracle` and runs on the first access to ``G, F, A, C`` or ``E``; ``sizes`` is
    ``(a_in, a_out, p)``; the hints are

    * ``linear = (W, x, g)``: the block is ``nn.Linear`` at one sample, θ = ``[vec(W), b]``
      (``p = m·(n + 1)``) or, without a bias, θ = ``vec(W)`` (``p = m·n``; the two told
      apart by ``sizes``), input ``x`` (``n × 1``), adjoint ``g`` (``m × 1``; ``None``
      where ``C = 0``), ``F = W``, ``A = 0``, ``E = 0``;
    * ``diagonal = (d, e)``: no parameters, ``F = diag(d)``, ``E = diag(e)`` (``a × 1``
      columns; ``e = None`` where ``E = 0``).

    A hint must describe exactly the oracle ``build()`` returns (the block test-suite
    compares them: :func:`tallskinny.blocks.testing.check_block`).
    """

    def __init__(self, build, sizes: tuple[int, int, int], *, linear=None, diagonal=None):
        self.__dict__.update(_build=build, _sizes=tuple(sizes), linear=linear, diagonal=diagonal)

    def __getattr__(self, name: str):
        # called only for an operator not made yet (an unset slot)
        build = self.__dict__.pop("_build", None)
        if build is None or name not in _FIELDS:
            raise AttributeError(name)
        full = build()
        for field in _FIELDS:
            object.__setattr__(self, field, getattr(full, field))
        return getattr(self, name)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.__dict__["_sizes"]

    @property
    def built(self) -> bool:
        """Whether the operators have been made."""
        return "_build" not in self.__dict__

    def astype(self, dtype: torch.dtype) -> Oracle:
        """A deferred oracle in ``dtype``: its hints cast now, its operators when first read."""

        def cast(hint):
            return None if hint is None else tuple(None if t is None else t.to(dtype) for t in hint)

        return DeferredOracle(
            lambda: Oracle.astype(self, dtype), self.sizes, linear=cast(self.linear), diagonal=cast(self.diagonal)
        )


_FIELDS = ("G", "F", "A", "C", "E")


@runtime_checkable
class DifferentiableBlock(Protocol):
    """A block of a chain: ``z_out = f(z_in; θ)``.

    ``parameters()`` returns the block's parameters (the user's own tensors, not
    copies), in the order in which they are flattened into ``θ``. ``forward`` and
    ``oracle`` take the parameter *values* explicitly (tensors of the same shapes),
    so the chain can evaluate them at detached copies without touching the model.
    ``oracle(..., second_order=False)`` may return zeros for ``A``, ``C``, ``E``
    (the Gauss–Newton matrix needs only ``G`` and ``F``).
    """

    def parameters(self) -> Sequence[Tensor]: ...

    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor: ...

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle: ...


@runtime_checkable
class LossBlock(Protocol):
    """The last block of a chain: a scalar ``loss(z, target)`` with no parameters.

    ``oracle(z, target)`` returns an :class:`Oracle` with ``a_out = 1``, ``p = 0``,
    ``F`` the gradient (``1 × a_in``) and ``E`` the Hessian w.r.t. ``z``.
    ``check_target`` raises a ``TypeError``/``ValueError`` for a target this loss
    cannot take (wrong dtype or shape), before any work is done.
    """

    def forward(self, z: Tensor, target: Tensor) -> Tensor: ...

    def oracle(self, z: Tensor, target: Tensor) -> Oracle: ...

    def check_target(self, z: Tensor, target: Tensor) -> None: ...


@runtime_checkable
class OracleMemory(Protocol):
    """A block (or loss block) that states, from shapes alone, how many bytes its
    ``oracle`` allocates: ``(kept, scratch)``, the tensors of the oracle it returns (kept
    by the curvature) and the peak of what it allocates besides while it runs (upper
    bounds, within about 2×). ``z_in``, ``z_out`` are the shapes of its input and output
    (``()`` for a loss), ``itemsize`` the bytes of one element.

    ``Chain.curvature`` adds them up (``Σ kept + max scratch``), before any oracle is
    made, to refuse a curvature that would not fit (:mod:`tallskinny.resources`). :class:`~tallskinny.blocks.Block`
    implements it for the ``torch.func`` fallback; an analytic block states what it forms.
    """

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]: ...
