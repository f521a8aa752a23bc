"""Hessian-vector products batched over runs of identical layers.

A run is ``J ≥ MIN_RUN`` consecutive pairs (``nn.Linear`` at one sample with a square
``W``, with or without a bias, then an elementwise block ``F = diag(d)``, ``E = diag(e)``)
of one shape. For one vector ``v = (W_v, b_v)`` per layer the tangent and adjoint sweeps of
:func:`tallskinny.elimination.hessian.hvp` through such a pair are

    y^A_j = W_j y_{j−1} + W_v x_j + b_v          y_j = d_j ⊙ y^A_j
    μ^A_j = d_j ⊙ μ_j + e_j ⊙ y^A_j              μ_{j−1} = W_jᵀ μ^A_j + W_vᵀ g_j
    (Hv)_j = (μ^A_j x_jᵀ + g_j y_{j−1}ᵀ,  μ^A_j)

(``x_j`` the layer's input, ``g_j`` the adjoint at its output; ``g = 0``, ``e = 0`` for the
Gauss–Newton matrix; ``b_v = 0`` and no bias part of ``Hv`` for bias-free layers). The recurrences take one matrix-vector product with the layer's own ``W`` per layer and
sweep (and one elementwise product); every other term is one batched operation for the
whole run, on the parameters' own layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import workspace


#: Runs shorter than this keep the per-block products and the per-stage elimination
#: (batching has a fixed cost).
MIN_RUN = 4


def _pair_fits(blocks: Sequence, i: int) -> bool:
    if i + 1 >= len(blocks):
        return False
    lin, act = blocks[i].linear, blocks[i + 1].diagonal
    return lin is not None and act is not None and lin[0].shape[0] == lin[0].shape[1]


def has_bias(block) -> bool:
    """Whether a block with a ``linear`` hint has a bias among its parameters
    (``p = m·(n + 1)``, not ``m·n``)."""
    return block.p > block.linear[0].numel()


def _kind(blocks: Sequence, i: int) -> tuple:
    """What the pairs of one run share: the shape of ``W``, whether it has a bias, and
    whether ``C``, ``E`` are zero."""
    W, _, g = blocks[i].linear
    return W.shape, has_bias(blocks[i]), g is None, blocks[i + 1].diagonal[1] is None


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
    (no copies) and their inputs, adjoints and activation derivatives stacked.

    The sweeps carry the pre-activation tangent ``y^A`` and the adjoint ``μ^A``, so that
    each takes one matrix-vector product per layer with ``WD_j = W_j diag(d_{j−1})``
    (made on first use, ``J − 1`` matrices):

        y^A_j = WD_j y^A_{j−1} + W_v x_j + b_v
        μ^A_{j−1} = WD_jᵀ μ^A_j + d_{j−1} ⊙ W_vᵀ g_j + e_{j−1} ⊙ y^A_{j−1}

    (the last terms of both are batched over the run)."""

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
        self.bias = has_bias(lin[0])
        self.p = self.m * self.n + self.m * self.bias
        self._WD = None

    def _scaled_weights(self) -> list[Tensor]:
        """``[W_j diag(d_{j−1})]`` for ``j = 1 … J−1`` (one batched product, once)."""
        if self._WD is None:
            WD = workspace.empty((self.J - 1, self.m, self.n), self.x)  # back to the pool with the run
            torch.stack(self.Ws[1:], out=WD).mul_(self.d[:-1].mT)
            workspace.recycle(self, WD)
            self._WD = WD.unbind(0)
        return self._WD

    def _adjoint_recurrence(self, mu: Tensor, YA: Tensor, h: Tensor | None, MA: Tensor) -> Tensor:
        """``μ^A_{j−1} = (W_j diag(d_{j−1}))ᵀ μ^A_j + c_{j−1}`` from
        ``μ^A_J = d_J ⊙ μ (+ e_J ⊙ y^A_J)``, stacked into ``MA`` (``J × m × k``), with
        ``c_{j−1} = d_{j−1} ⊙ h_j + e_{j−1} ⊙ y^A_{j−1}`` (``h_j = W_{v,j}ᵀ g``); returns the
        adjoint at the run's input, ``W_1ᵀ μ^A_1 (+ h_1)``."""
        J, WD = self.J, self._scaled_weights()
        c = None if h is None else self.d[:-1] * h[1:]
        if self.e is not None:
            c = self.e[:-1] * YA[:-1] if c is None else c.addcmul_(self.e[:-1], YA[:-1])
        c = None if c is None else c.unbind(0)
        muA = self.d[-1] * mu if self.e is None else torch.addcmul(self.d[-1] * mu, self.e[-1], YA[-1])
        muAs = [muA] * J
        for j in range(J - 1, 0, -1):
            muA = muAs[j - 1] = WD[j - 1].mT @ muA if c is None else torch.addmm(c[j - 1], WD[j - 1].mT, muA)
        torch.stack(muAs, out=MA)
        return self.Ws[0].mT @ muA if h is None else torch.addmm(h[0], self.Ws[0].mT, muA)

    def tangents(self, y: Tensor | None, v: Tensor):
        """The tangent at the run's output; what the adjoint sweep needs of this one."""
        if v.shape[1] != 1:
            return self._tangents_columns(y, v)
        J, m, n = self.J, self.m, self.n
        vv = v.reshape(J, self.p)
        vW = vv[:, : m * n].reshape(J, m, n)
        if self.bias:
            vb = vv[:, m * n :].unsqueeze(-1)
            gv = torch.baddbmm(vb, vW, self.x).unbind(0)  # W_v x + b_v
        else:
            vb, gv = None, torch.bmm(vW, self.x).unbind(0)  # W_v x
        WD = self._scaled_weights()
        yA = gv[0] if y is None else torch.addmm(gv[0], self.Ws[0], y)
        yAs = [yA] * J
        for j in range(1, J):  # y^A_j = W_j (d_{j−1} ⊙ y^A_{j−1}) + W_v x_j + b_v
            yA = yAs[j] = torch.addmm(gv[j], WD[j - 1], yA)
        YA = torch.stack(yAs)  # J × m × 1
        return self.d[-1] * yA, (vW, vb, y, YA)

    def adjoints(self, mu: Tensor, saved, out: Tensor | None = None, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """``(Hv + shift·v)`` of the run's parameters (written into the contiguous
        ``(p_run, k)`` tensor ``out`` if given) and the adjoint at its input."""
        if mu.shape[1] != 1:
            return self._adjoints_columns(mu, saved, out, shift)
        J, m, n = self.J, self.m, self.n
        vW, vb, y_in, YA = saved
        h = None if self.g is None else vW.mT @ self.g  # W_vᵀ g, J × n × 1
        if out is None:
            out = mu.new_empty(J * self.p, 1)
        # views of out (.view: never a silent copy), written in place
        o = out.view(J, -1)
        HW = o[:, : m * n].view(J, m, n)
        MA = o[:, m * n :].unsqueeze(-1) if self.bias else mu.new_empty(J, m, 1)  # the bias part: μ^A
        mu_in = self._adjoint_recurrence(mu, YA, h, MA)
        if self.g is None:
            left, right = MA, self.x.mT  # μ^A xᵀ
        else:
            # y_{j−1} = d_{j−1} ⊙ y^A_{j−1} (the Linear's input tangent; y_in at the first)
            Y = torch.empty_like(YA)  # square W: n = m
            Y[0] = 0.0 if y_in is None else y_in
            torch.mul(self.d[:-1], YA[:-1], out=Y[1:])
            left, right = torch.cat((MA, self.g), dim=2), torch.cat((self.x, Y), dim=2).mT  # μ^A xᵀ + g yᵀ
        if shift:  # + shift·v, in the same pass
            torch.baddbmm(vW, left, right, beta=shift, out=HW)
            if self.bias:
                MA.add_(vb, alpha=shift)  # after the product above, which reads μ^A
        else:
            torch.bmm(left, right, out=HW)
        return out, mu_in

    def _tangents_columns(self, y: Tensor | None, v: Tensor):
        """:meth:`tangents` for ``k ≠ 1`` columns: one ``m × k`` product per layer, the
        columns last (``v`` read as ``J × p × k``)."""
        J, m, n, k = self.J, self.m, self.n, v.shape[1]
        vv = v.reshape(J, self.p, k)
        vW = vv[:, : m * n].reshape(J, m, n, k)
        vb = vv[:, m * n :] if self.bias else None  # J × m × k
        gv = (vW * self.x.reshape(J, 1, n, 1)).sum(2)  # W_v x (3× J·m tiny matmuls)
        if vb is not None:
            gv = gv + vb
        gv = gv.unbind(0)
        WD = self._scaled_weights()
        yA = gv[0] if y is None else torch.addmm(gv[0], self.Ws[0], y)
        yAs = [yA] * J
        for j in range(1, J):
            yA = yAs[j] = torch.addmm(gv[j], WD[j - 1], yA)
        YA = torch.stack(yAs)  # J × m × k
        return self.d[-1] * yA, (vW, vb, y, YA)

    def _adjoints_columns(self, mu: Tensor, saved, out: Tensor | None, shift: float) -> tuple[Tensor, Tensor]:
        """:meth:`adjoints` for ``k ≠ 1`` columns."""
        J, m, n, k = self.J, self.m, self.n, mu.shape[1]
        vW, vb, y_in, YA = saved
        h = None if self.g is None else (vW * self.g.reshape(J, m, 1, 1)).sum(1)  # W_vᵀ g, J × n × k
        if out is None or not out.is_contiguous():
            result = mu.new_empty(J * self.p, k)
            _, mu_in = self._adjoints_columns(mu, saved, result, shift)
            if out is None:
                return result, mu_in
            out.copy_(result)
            return out, mu_in
        o = out.view(J, self.p, k)
        HW = o[:, : m * n].view(J, m, n, k)
        MA = o[:, m * n :] if self.bias else mu.new_empty(J, m, k)  # μ^A, the bias part
        mu_in = self._adjoint_recurrence(mu, YA, h, MA)
        torch.mul(MA.unsqueeze(2), self.x.reshape(J, 1, n, 1), out=HW)  # μ^A xᵀ, column by column
        if self.g is not None:
            # + g yᵀ with y_{j−1} = d_{j−1} ⊙ y^A_{j−1} (y_in at the first)
            Y = torch.empty_like(YA)  # square W: n = m
            Y[0] = 0.0 if y_in is None else y_in
            torch.mul(self.d[:-1], YA[:-1], out=Y[1:])
            HW.addcmul_(self.g.reshape(J, m, 1, 1), Y.unsqueeze(1))
        if shift:
            HW.add_(vW, alpha=shift)
            if self.bias:
                MA.add_(vb, alpha=shift)
        return out, mu_in
