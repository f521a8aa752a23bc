"""Hessian-vector products batched over runs of identical layers.

A run is ``J ≥ MIN_RUN`` consecutive pairs (``nn.Linear`` at one sample with bias and a
square ``W``, then an elementwise block ``F = diag(d)``, ``E = diag(e)``) of one shape.
For one vector ``v = (W_v, b_v)`` per layer the tangent and adjoint sweeps of
:func:`tallskinny.products.hvp` through such a pair are

    y^A_j = W_j y_{j−1} + W_v x_j + b_v          y_j = d_j ⊙ y^A_j
    μ^A_j = d_j ⊙ μ_j + e_j ⊙ y^A_j              μ_{j−1} = W_jᵀ μ^A_j + W_vᵀ g_j
    (Hv)_j = (μ^A_j x_jᵀ + g_j y_{j−1}ᵀ,  μ^A_j)

(``x_j`` the layer's input, ``g_j`` the adjoint at its output; ``g = 0``, ``e = 0`` for the
Gauss–Newton matrix). The recurrences take one matrix-vector product with the layer's own ``W`` per layer and
sweep (and one elementwise product); every other term is one batched operation for the
whole run, on the parameters' own layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: Runs shorter than this keep the per-block products (batching has a fixed cost).
MIN_RUN = 4


def _pair_fits(blocks: Sequence, i: int) -> bool:
    if i + 1 >= len(blocks):
        return False
    lin, act = blocks[i].linear, blocks[i + 1].diagonal
    return lin is not None and act is not None and lin[0].shape[0] == lin[0].shape[1]


def _kind(blocks: Sequence, i: int) -> tuple:
    """What the pairs of one run share: the shape of ``W``, and whether ``C``, ``E`` are zero."""
    W, _, g = blocks[i].linear
    return W.shape, g is None, blocks[i + 1].diagonal[1] is None


def pair_runs(n: int, fits, key, min_run: int) -> list[tuple[int, int]]:
    """Maximal ranges ``[start, end)`` of ``≥ min_run`` consecutive pairs ``(i, i + 1)``
    with ``fits(i)`` and one ``key(i)``, among ``n`` stages or blocks."""
    runs = []
    i = 0
    while i < n:
        if not fits(i):
            i += 1
            continue
        kind = key(i)
        j = i + 2
        while fits(j) and key(j) == kind:
            j += 2
        if (j - i) // 2 >= min_run:
            runs.append((i, j))
        i = j
    return runs


def find_runs(blocks: Sequence) -> list[tuple[int, int]]:
    """Maximal ranges ``[start, end)`` of ``≥ MIN_RUN`` batchable pairs of one shape."""
    return pair_runs(len(blocks), lambda i: _pair_fits(blocks, i), lambda i: _kind(blocks, i), MIN_RUN)


class HVPRun:
    """The data of a run of ``J`` pairs (made once per curvature): the layers' own ``W``
    (no copies) and their inputs, adjoints and activation derivatives stacked."""

    def __init__(self, blocks: Sequence):
        lin, act = blocks[0::2], blocks[1::2]
        self.J = len(lin)
        self.Ws = [b.linear[0] for b in lin]  # m × n each, the parameters themselves
        self.m, self.n = self.Ws[0].shape
        self.x = torch.stack([b.linear[1] for b in lin])  # J × n × 1
        gs = [b.linear[2] for b in lin]
        self.g = None if gs[0] is None else torch.stack(gs)  # J × m × 1 (None: C = 0)
        self.d = torch.stack([b.diagonal[0] for b in act])  # J × m × 1
        es = [b.diagonal[1] for b in act]
        self.e = None if es[0] is None else torch.stack(es)
        self.p = self.m * self.n + self.m

    def tangents(self, y: Tensor | None, v: Tensor):
        """The tangent at the run's output; what the adjoint sweep needs of this one."""
        J, m, n = self.J, self.m, self.n
        vv = v.reshape(J, self.p)
        vW, vb = vv[:, : m * n].reshape(J, m, n), vv[:, m * n :].unsqueeze(-1)
        gv = torch.baddbmm(vb, vW, self.x).unbind(0)  # W_v x + b_v
        d, Ws = self.d.unbind(0), self.Ws
        y = v.new_zeros(n, 1) if y is None else y
        ys, yAs = [y] * J, [y] * J
        for j in range(J):  # y^A = W y + W_v x + b_v, y ← d ⊙ y^A
            ys[j] = y
            yA = yAs[j] = torch.addmm(gv[j], Ws[j], y)
            y = d[j] * yA
        return y, (vW, torch.stack(ys), yAs)

    def adjoints(self, mu: Tensor, saved, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(Hv)`` of the run's parameters (written into the contiguous ``(p_run, 1)``
        tensor ``out`` if given) and the adjoint at its input."""
        J = self.J
        vW, Y, yAs = saved
        h = (vW.mT @ self.g).unbind(0) if self.g is not None else [None] * J  # W_vᵀ g
        d, e, Ws = self.d.unbind(0), (None if self.e is None else self.e.unbind(0)), self.Ws
        muAs = [mu] * J
        for j in range(J - 1, -1, -1):  # μ^A = d ⊙ μ + e ⊙ y^A, μ ← Wᵀ μ^A + W_vᵀ g
            muA = muAs[j] = d[j] * mu if e is None else torch.addcmul(d[j] * mu, e[j], yAs[j])
            mu = Ws[j].mT @ muA if h[j] is None else torch.addmm(h[j], Ws[j].mT, muA)
        mu_in = mu
        if out is None:
            out = mu.new_empty(J * self.p, 1)
        # views of out (.view: never a silent copy), written in place
        o = out.view(J, -1)
        HW, muA = o[:, : self.m * self.n].view(J, self.m, self.n), o[:, self.m * self.n :].unsqueeze(-1)
        torch.stack(muAs, out=muA)
        if self.g is None:
            torch.bmm(muA, self.x.mT, out=HW)  # μ^A xᵀ
        else:
            torch.bmm(torch.cat((muA, self.g), dim=2), torch.cat((self.x, Y), dim=2).mT, out=HW)  # μ^A xᵀ + g yᵀ
        return out, mu_in
