"""Hessian-vector products batched over runs of identical layers.

A run is ``J ≥ MIN_RUN`` consecutive pairs (``nn.Linear`` at one sample with bias and a
square ``W``, then an elementwise block ``F = diag(d)``, ``E = diag(e)``) of one shape.
For one vector ``v = (W_v, b_v)`` per layer the tangent and adjoint sweeps of
:func:`tallskinny.products.hvp` through such a pair are

    y^A_j = W_j y_{j−1} + W_v x_j + b_v          y_j = d_j ⊙ y^A_j
    μ^A_j = d_j ⊙ μ_j + e_j ⊙ y^A_j              μ_{j−1} = W_jᵀ μ^A_j + W_vᵀ g_j
    (Hv)_j = (μ^A_j x_jᵀ + g_j y_{j−1}ᵀ,  μ^A_j)

(``x_j`` the layer's input, ``g_j`` the adjoint at its output; ``g = 0``, ``e = 0`` for the
Gauss–Newton matrix). With ``A_j = diag(d_j) W_j``
the recurrences are ``y_j = A_j y_{j−1} + d_j ⊙ (W_v x_j + b_v)`` and
``μ_{j−1} = A_jᵀ μ_j + W_jᵀ(e_j ⊙ y^A_j) + W_vᵀ g_j``: one matrix-vector product per
layer and sweep; every other term is one batched operation for the whole run, on the
parameters' own layout.
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
    """The data of a run of ``J`` pairs, stacked (made once per curvature)."""

    def __init__(self, blocks: Sequence):
        lin, act = blocks[0::2], blocks[1::2]
        self.J = len(lin)
        self.W = torch.stack([b.linear[0] for b in lin])  # J × m × n
        self.m, self.n = self.W.shape[1], self.W.shape[2]
        self.x = torch.stack([b.linear[1] for b in lin])  # J × n × 1
        gs = [b.linear[2] for b in lin]
        self.g = None if gs[0] is None else torch.stack(gs)  # J × m × 1 (None: C = 0)
        self.d = torch.stack([b.diagonal[0] for b in act])  # J × m × 1
        es = [b.diagonal[1] for b in act]
        self.e = None if es[0] is None else torch.stack(es)
        self.dW = self.d * self.W  # diag(d) W
        self.A = self.dW.unbind(0)
        self.p = self.m * self.n + self.m

    def tangents(self, y: Tensor | None, v: Tensor):
        """The tangent at the run's output; what the adjoint sweep needs of this one."""
        J, m, n = self.J, self.m, self.n
        vv = v.reshape(J, self.p)
        vW, vb = vv[:, : m * n].reshape(J, m, n), vv[:, m * n :].unsqueeze(-1)
        gv = torch.baddbmm(vb, vW, self.x)  # W_v x + b_v
        c = (self.d * gv).unbind(0)
        y = v.new_zeros(n, 1) if y is None else y
        ys, A = [y] * J, self.A
        for j in range(J - 1):
            y = ys[j + 1] = torch.addmm(c[j], A[j], y)
        y_out = torch.addmm(c[J - 1], A[J - 1], y)
        Y = torch.stack(ys)  # the layers' input tangents
        yA = torch.baddbmm(gv, self.W, Y)  # the Linear outputs' tangents
        return y_out, (vW, Y, yA)

    def adjoints(self, mu: Tensor, saved, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(Hv)`` of the run's parameters (written into the contiguous ``(p_run, 1)``
        tensor ``out`` if given) and the adjoint at its input."""
        J = self.J
        vW, Y, yA = saved
        h = None if self.g is None else vW.mT @ self.g  # W_vᵀ g
        if self.e is not None:
            eyA = self.W.mT @ (self.e * yA)
            h = eyA if h is None else h + eyA
        h = (Y.new_zeros(J, self.n, 1) if h is None else h).unbind(0)
        mus, A = [mu] * J, self.A
        for j in range(J - 1, 0, -1):
            mu = mus[j - 1] = torch.addmm(h[j], A[j].mT, mu)
        mu_in = torch.addmm(h[0], A[0].mT, mu)
        if out is None:
            out = mu.new_empty(J * self.p, 1)
        # views of out (.view: never a silent copy), written in place
        o = out.view(J, -1)
        HW, muA = o[:, : self.m * self.n].view(J, self.m, self.n), o[:, self.m * self.n :].unsqueeze(-1)
        torch.mul(self.d, torch.stack(mus), out=muA)
        if self.e is not None:
            muA.addcmul_(self.e, yA)
        if self.g is None:
            torch.bmm(muA, self.x.mT, out=HW)  # μ^A xᵀ
        else:
            torch.bmm(torch.cat((muA, self.g), dim=2), torch.cat((self.x, Y), dim=2).mT, out=HW)  # μ^A xᵀ + g yᵀ
        return out, mu_in
