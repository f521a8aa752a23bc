"""A stage whose parameters are a permutation of another stage's."""

from __future__ import annotations

import torch
from torch import Tensor

from ...linalg import Inertia
from ...linalg.kronecker import Permutation
from . import Stage, StageFactor


class PermutedStage(Stage):
    """The stage ``inner`` in the coordinates ``θ' = P θ`` (``P`` a permutation, applied as
    ``θ'_k = θ[P.index[k]]``): an affine block's dense stage run on ``vec Θ̃`` (``P = P_θ``)
    instead of θ. The sweeps gather ``b`` into the inner stage's order and scatter ``θ``
    back; inertia and log-determinant are the inner stage's (a permutation is a
    congruence). The inner factors write no result in place (``writes_in_place``)."""

    def __init__(self, inner: Stage, order: Permutation):
        self.inner, self.order = inner, order
        self.p = inner.p
        self.inverse = torch.argsort(order.index)

    @property
    def takes_supported(self) -> bool:
        return self.inner.takes_supported

    def eliminate(self, S, damping: float, index: int):
        S_new, factor = self.inner.eliminate(S, damping, index)
        return S_new, PermutedFactor(self, factor)


class PermutedFactor(StageFactor):
    __slots__ = ("stage", "inner")

    def __init__(self, stage: PermutedStage, inner: StageFactor):
        if inner.writes_in_place or inner.keeps_input:
            raise TypeError(f"PermutedStage cannot wrap a {type(inner).__name__} that writes in place or keeps its input")
        self.stage, self.inner = stage, inner

    @property
    def unchecked(self):
        return self.inner.unchecked

    @property
    def inertia(self) -> Inertia:
        return self.inner.inertia

    @property
    def logdet(self) -> Tensor:
        return self.inner.logdet

    def pivot_factors(self) -> tuple:
        return self.inner.pivot_factors()

    def span_pivot(self):
        return self.inner.span_pivot()

    def backward(self, t: Tensor | None, b: Tensor):
        return self.inner.backward(t, b[self.stage.order.index])

    def forward(self, y: Tensor | None, u):
        theta, y_new = self.inner.forward(y, u)
        return theta[self.stage.inverse], y_new
