"""The stages of the elimination: one per block of the chain (or per run of blocks).

A stage holds the ε-independent data of its block(s), prepared once per curvature by
:func:`tallskinny.elimination.prepare.prepare_stages`. At a damping ``ε`` the backward
Riccati step turns the value Hessian ``S`` at the block's output into the one at its input,

    Q_θθ = A + εI + GᵀSG     Q_θy = C + GᵀSF
    S ← E + FᵀSF − Q_θyᵀ Q_θθ⁻¹ Q_θy,

and records what the two sweeps of a solve need in a :class:`StageFactor`.

To add a stage, implement
    * a :class:`Stage` subclass with ``p`` (its parameters), ``blocks`` (how many
      consecutive blocks it eliminates, 1 unless a run) and
      ``eliminate(S, damping, index) -> (S_new, factor)`` (``S_new`` a dense tensor or a
      :class:`~tallskinny.elimination.supported.Supported`; ``S`` one only for a stage
      that says ``takes_supported``), where ``factor`` is a
      :class:`StageFactor` or ``None`` for a stage without parameters (then the sweeps
      call ``F_apply``/``FT_apply``: ``y ← F y``, ``t ← Fᵀ t``). ``index`` is the block's
      position, for the :class:`~tallskinny.elimination.algebra.StageSingular` it raises
      when ``Q_θθ`` is singular;
    * a :class:`StageFactor` subclass with ``inertia`` and ``logdet`` (of ``Q_θθ``),
      ``backward(t, b) -> (u, t_new)`` (the adjoint ``t ← Fᵀt − Q_θyᵀ Q_θθ⁻¹(Gᵀt − b)``,
      ``u`` what the forward sweep needs) and ``forward(y, u) -> (θ, y_new)``;
      optionally ``unchecked`` (a factor whose pivots are tested after the sweep),
      ``span_pivot()`` (a free lower bound of ``‖H‖``) and the flags below;
    * a case in :func:`~tallskinny.elimination.prepare.prepare_stages` that picks it.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


class StageFactor:
    """One stage's factor of ``Q_θθ`` at one damping, and its two sweeps.

    Must be written: ``inertia``, ``logdet`` (attributes or properties), ``backward``,
    ``forward``. May be overridden: ``unchecked``, ``pivot_factors``, ``span_pivot``, the
    two flags."""

    #: A :class:`~tallskinny.elimination.algebra.SymmetricFactor` whose pivots are tested
    #: after the whole backward sweep (one synchronisation), or ``None``.
    unchecked = None
    #: The factor keeps the value Hessian it was given (its buffer is not recycled).
    keeps_input = False
    #: ``forward(y, u, out=...)`` writes ``θ`` into ``out`` and returns ``(None, y_new)``.
    writes_in_place = False

    def backward(self, t: Tensor | None, b: Tensor):
        raise NotImplementedError

    def forward(self, y: Tensor | None, u):
        raise NotImplementedError

    def pivot_factors(self) -> tuple:
        """The :class:`~tallskinny.elimination.algebra.SymmetricFactor` s whose inertia
        :attr:`inertia` reads (the factorization computes those not yet known all at once,
        :func:`~tallskinny.elimination.algebra.fill_inertias`)."""
        return ()

    def span_pivot(self):
        """``Q_θθ`` as a :class:`~tallskinny.elimination.algebra.SymmetricFactor` where the
        stage is the span of a linear block (``Q − εI = VᵀH_ll V``), else ``None``."""
        return None


class Stage:
    """The ε-independent data of one block (or a run of ``blocks`` blocks).

    Must be written: ``p`` and ``eliminate``. Stages without parameters also write
    ``F_apply`` and ``FT_apply``."""

    #: The number of parameters the stage eliminates.
    p: int = 0
    #: The number of consecutive blocks it eliminates (the next ones hold ``COVERED``).
    blocks: int = 1
    #: ``eliminate`` accepts a :class:`~tallskinny.elimination.supported.Supported` value
    #: Hessian (else it is given the dense matrix).
    takes_supported: bool = False

    def eliminate(self, S: Tensor, damping: float, index: int) -> tuple[Tensor, StageFactor | None]:
        raise NotImplementedError

    @property
    def F_apply(self) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    @property
    def FT_apply(self) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError


__all__ = ["Stage", "StageFactor"]
