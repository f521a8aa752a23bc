"""The stagewise elimination of ``(H + εI) x = b`` over the oracles of a chain.

``H`` is the Hessian of ``loss(z_L)`` with ``z_l = f_l(z_{l-1}; θ_l)``. With the oracles
``(G_l, F_l, A_l, C_l, E_l)`` of each block and the Hessian ``E_loss`` of the loss w.r.t.
its input, ``x = (H + εI)^{-1} b`` minimises the LQ control problem

    Σ_l ½ θ_lᵀ(A_l + εI)θ_l + θ_lᵀ C_l y_{l-1} + ½ y_{l-1}ᵀ E_l y_{l-1} − b_lᵀθ_l + ½ y_Lᵀ E_loss y_L
    subject to y_l = F_l y_{l-1} + G_l θ_l,  y_0 = 0.

Eliminating the stages from the loss backwards is the Riccati recursion (value Hessian
``S`` and gradient ``t`` w.r.t. ``y_l``, starting from ``S = E_loss``, ``t = 0``):

    Q_θθ = A + εI + GᵀSG     Q_θy = C + GᵀSF     Q_yy = E + FᵀSF
    S ← Q_yy − Q_θyᵀ Q_θθ⁻¹ Q_θy          t ← Fᵀt − Q_θyᵀ Q_θθ⁻¹ (Gᵀt − b_l)

followed by the forward sweep ``θ_l = −Q_θθ⁻¹(Q_θy y_{l-1} + Gᵀt_l − b_l)``,
``y_l = F y_{l-1} + G θ_l``. It is a block LDLᵀ of ``H + εI`` taken from the last block
backwards, so by Sylvester's law ``inertia(H + εI) = Σ_l inertia(Q_θθ,l)`` and
``log|det(H + εI)| = Σ_l log|det Q_θθ,l|``.

When a stage ``Q_θθ,l`` is singular although ``H + εI`` is not, the recursion cannot
pivot across stages; then the symmetric block-tridiagonal KKT system of the control
problem is assembled and factored by :mod:`tallskinny.linalg`, which does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..blocks.protocol import Oracle
from ..linalg import Inertia
from . import workspace
from .algebra import StageSingular, fill_inertias, first_singular, symmetrize
from .stages import Stage, StageFactor
from .supported import Supported, buffer


def _last_block_norm(factors, damping: float) -> float:
    """A lower bound of ``‖H‖₂`` known for free: the last block with parameters sees the
    loss's own value Hessian (nothing is eliminated after it), so its span pivot
    ``Q − εI = VᵀH_LL V`` (orthonormal ``V``, linear block) is a compression of a diagonal
    block of ``H``, and ``‖H‖ ≥ ‖Q − εI‖₂`` (its eigenvalues up to 128 × 128, the
    largest column norm beyond). ``0`` where that does not hold."""
    last = next((f for f in reversed(factors) if f is not None), None)
    factor = last.span_pivot() if last is not None else None
    if factor is None:
        return 0.0
    Q = factor.matrix.clone()
    Q.diagonal().sub_(damping)
    if Q.numel() == 0:
        return 0.0
    if Q.shape[0] <= 128:
        return float(torch.linalg.eigvalsh(Q).abs().max())
    return float(torch.linalg.vector_norm(Q, dim=0).max())


class RiccatiFactorization:
    """``H + εI`` factored stage by stage (see the module docstring)."""

    def __init__(self, stages: Sequence[Stage], loss: Oracle, damping: float):
        self.damping = damping
        self._stages = list(stages)
        self._factors: list[StageFactor | None] = [None] * len(stages)
        S = symmetrize(loss.E.to_dense())
        unchecked: list = []  # (stage, factor) whose pivots are tested after the sweep
        try:
            for i in reversed(range(len(stages))):
                if isinstance(S, Supported) and not stages[i].takes_supported:
                    S = S.dense()
                S_new, f = stages[i].eliminate(S, damping, i)
                # S is consumed: its buffer goes to the workspace pool, unless the factor
                # keeps it (a run, for its inertia) or the new S shares its memory
                consumed, kept = buffer(S), buffer(S_new)
                shared = kept.untyped_storage().data_ptr() == consumed.untyped_storage().data_ptr()
                if (f is None or not f.keeps_input) and not shared:
                    workspace.give(consumed)
                S = S_new
                self._factors[i] = f
                if f is not None and f.unchecked is not None:
                    unchecked.append((i, f.unchecked))
        except (StageSingular, RuntimeError):
            # a singular stage passed unnoticed makes later ones fail on its infs/NaNs:
            # the first singular stage is the one to report
            bad = first_singular(unchecked)
            if bad is not None:
                raise StageSingular(bad) from None
            raise
        bad = first_singular(unchecked)
        if bad is not None:
            raise StageSingular(bad)
        self._inertia = self._logdet = self._plan = None
        self.norm_lower_bound = _last_block_norm(self._factors, damping)

    def _sweep_plan(self) -> tuple[list, list]:
        """The sweeps' steps in forward order, ``(start, end, factor)`` for a single stage
        (``end = start + 1``) or a run of stages (:mod:`tallskinny.elimination.stages.run`), and
        the number of parameters of each step."""
        if self._plan is None:
            stages, factors = self._stages, self._factors
            plan, i = [], 0
            while i < len(stages):
                end = i + stages[i].blocks
                plan.append((i, end, factors[i]))
                i = end
            self._plan = (plan, [sum(s.p for s in stages[start:end]) for start, end, _ in plan])
        return self._plan

    def solve(self, b: Tensor) -> Tensor:
        """``(H + εI)^{-1} b`` for ``b`` of shape ``(P, k)``: two sweeps, no refactoring."""
        stages = self._stages
        plan, sizes = self._sweep_plan()
        bs = torch.split(b, sizes, dim=0)
        t = None
        us: list = [None] * len(plan)
        for n in reversed(range(len(plan))):
            start, _, f = plan[n]
            if f is None:
                t = None if t is None else stages[start].FT_apply(t)
            else:
                us[n], t = f.backward(t, bs[n])
        y = None
        x = b.new_empty(b.shape)  # the solution, written step by step
        offset = 0
        for n, (start, _, f) in enumerate(plan):
            if f is None:
                y = None if y is None else stages[start].F_apply(y)
                continue
            part = x[offset : offset + sizes[n]]
            offset += sizes[n]
            if f.writes_in_place:
                _, y = f.forward(y, us[n], out=part)  # written in place
            else:
                theta, y = f.forward(y, us[n])
                part.copy_(theta)
        return x

    def logdet(self) -> Tensor:
        """``Σ_l log|det Q_θθ,l|`` (computed on first request)."""
        if self._logdet is None:
            records = [f for f in self._factors if f is not None]
            self._logdet = torch.stack([f.logdet for f in records]).sum() if records else torch.zeros(())
        return self._logdet

    def sign(self) -> Tensor:
        return self.logdet().new_tensor(-1.0 if self.inertia().negative % 2 else 1.0)

    def inertia(self) -> Inertia:
        """``Σ_l inertia(Q_θθ,l)`` by Sylvester's law (computed on first request)."""
        if self._inertia is None:
            fill_inertias([p for f in self._factors if f is not None for p in f.pivot_factors()])
            pos = neg = 0
            for f in self._factors:
                if f is not None:
                    inertia = f.inertia
                    pos, neg = pos + inertia.positive, neg + inertia.negative
            self._inertia = Inertia(pos, neg, 0)
        return self._inertia
