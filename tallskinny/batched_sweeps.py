"""The solve sweeps of a run of identical layers, batched over the layers.

At one sample, the stages of ``nn.Linear`` (``F = W``, ``G_V = σI`` on the span, ``C``
of rank one) followed by a diagonal activation ``D = diag(d)`` make the sweeps of
:class:`~tallskinny.elimination.RiccatiFactorization` linear recurrences of one small
vector per layer. With the stage's factor ``Q_ζζ`` (LU), ``K = Q_ζζ⁻¹Q_ζy`` and
``N = W − σK``, the backward sweep through layer ``j`` is

    t_j^A = d_j ⊙ τ_j                       (the adjoint at the Linear's output)
    τ_{j−1} = Nᵀ t_j^A + Kᵀ b_ζ + C_⊥ᵀ b_⊥ / ε
    ν_j = Q_ζζ⁻¹ (b_ζ − σ t_j^A)

and the forward sweep ``y_j = d_j ⊙ (N y_{j−1} + σ ν_j)``, ``ζ_j = ν_j − K y_{j−1}``,
``Θ̃ᵀ = b_⊥/ε + v ζᵀ − C_⊥ y/ε``. With ``A = diag(d) N`` the recurrences are
``y_j = A_j y_{j−1} + σ d ⊙ ν_j`` and ``τ_{j−1} = A_jᵀ τ_j + h_j``: one matrix-vector
product per layer and sweep. Everything else is computed for all layers of the run at
once, as batched tensor operations on the parameters' own layout (``[W | bias]``, no
gathers): a run of ``J`` layers costs about ``2J + 25`` torch calls per solve instead of
about twenty per layer. The sums are those of the per-stage sweeps (``Kᵀ`` replaces
``Q_ζyᵀQ_ζζ⁻¹``); the results agree to rounding. One right-hand side at a time (blocks
of ``k`` already amortise the per-layer calls over their columns).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .affine import AffineStage
from .batched_products import pair_runs
from .linalg import Diagonal

#: Runs shorter than this keep the per-stage sweeps (batching has a fixed cost).
MIN_RUN = 4


def _pair_fits(stages: Sequence, factors: Sequence, i: int) -> bool:
    """Whether stages ``i, i+1`` are a one-sample ``nn.Linear`` stage (square ``W``, with
    bias, in its own ``[W | bias]`` layout) and a diagonal activation."""
    if i + 1 >= len(stages):
        return False
    st, act = stages[i], stages[i + 1]
    f = factors[i]
    return (
        isinstance(st, AffineStage)
        and st.linear is not None
        and st.r == 1
        and st.m == st.W.shape[1]
        and f is not None
        and f.factor is not None
        and f.factor._lu is not None
        and factors[i + 1] is None
        and getattr(act, "p", None) == 0
        and isinstance(act.F, Diagonal)
    )


def find_runs(stages: Sequence, factors: Sequence) -> list[tuple[int, int]]:
    """Maximal ranges ``[start, end)`` of ``≥ MIN_RUN`` batchable pairs of one shape."""
    return pair_runs(len(stages), lambda i: _pair_fits(stages, factors, i), lambda i: stages[i].W.shape, MIN_RUN)


class _RunLayers:
    """The ε-independent data of a run, stacked over its ``J`` layers (made once per
    curvature and kept on the run's first stage)."""

    def __init__(self, stages: Sequence):
        lin, act = stages[0::2], stages[1::2]
        first = lin[0]
        self.J, self.m, self.p = len(lin), first.m, first.p
        self.n = first.q - 1
        v = torch.stack([s.Vt[0] for s in lin])  # J × q, the unit vectors x̃/‖x̃‖
        self.v_in, self.v_bias = v[:, : self.n].unsqueeze(-1), v[:, self.n :].unsqueeze(-1)  # J × n × 1, J × 1 × 1
        # g = 0 where C = 0 (Gauss–Newton): the C-terms vanish
        self.g = torch.stack([s.g if s.Gam is not None else s.W.new_zeros(self.m, 1) for s in lin])  # J × m × 1
        d = torch.stack([s.F.diagonal for s in act]).unsqueeze(-1)  # J × m × 1
        self.sigma = first.W.new_tensor([s.scalar for s in lin]).reshape(-1, 1, 1)
        self.sigma_d = self.sigma * d
        self.dW = d * torch.stack([s.W for s in lin])  # diag(d) W, J × m × n


class BatchedRun:
    """The sweeps of stages ``[start, end)`` with one factorization's factors."""

    def __init__(self, stages: Sequence, factors: Sequence, start: int, end: int, damping: float):
        first = stages[start]
        cached = first.__dict__.get("_run_layers")
        if cached is None or cached[0] != end:
            cached = (end, _RunLayers(stages[start:end]))
            first.__dict__["_run_layers"] = cached
        L = self.layers = cached[1]
        self.damping = damping
        fs = [factors[i] for i in range(start, end, 2)]
        self.K = torch.stack([f.K for f in fs])  # J × m × n
        self.lu = torch.stack([f.factor._lu for f in fs])
        self.piv = torch.stack([f.factor._piv for f in fs])
        # A = diag(d)(W − σK); the backward recurrence uses Aᵀ (a transposed view)
        self.A = torch.addcmul(L.dW, L.sigma_d, self.K, value=-1.0).unbind(0)

    def _split(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """``b`` of the run as ``W``-shaped (``J × m × n``) and bias (``J × m × 1``) views."""
        L = self.layers
        b = b.reshape(L.J, L.p)
        mn = L.m * L.n
        return b[:, :mn].reshape(L.J, L.m, L.n), b[:, mn:].unsqueeze(-1)

    def backward(self, t: Tensor | None, b: Tensor):
        """``ν`` of every layer, and the adjoint ``t`` at the run's input."""
        L, eps = self.layers, self.damping
        Wb, bb = self._split(b)
        # b_ζ = Θ̃_b v (J × m × 1) and h = Kᵀ b_ζ + C_⊥ᵀ b_⊥ / ε, where for
        # b_⊥ = Θ̃_b − b_ζ vᵀ: C_⊥ᵀ b_⊥ = Wbᵀ g − v_in (gᵀ b_ζ)
        Zb = torch.baddbmm(bb * L.v_bias, Wb, L.v_in)
        c = torch.baddbmm(Wb.mT @ L.g, L.v_in, L.g.mT @ Zb, alpha=-1.0)
        h = torch.baddbmm(c, self.K.mT, Zb, beta=1.0 / eps).unbind(0)
        # τ_{j−1} = A_jᵀ τ_j + h_j (fresh results: cheaper than out= into a buffer)
        J, A = L.J, self.A
        tau = b.new_zeros(L.m, 1) if t is None else t
        taus = [tau] * J
        for j in range(J - 1, 0, -1):
            tau = taus[j - 1] = torch.addmm(h[j], A[j].mT, tau)
        t_in = torch.addmm(h[0], A[0].mT, tau)
        # ν = Q_ζζ⁻¹(b_ζ − σ d ⊙ τ)
        nu = torch.linalg.lu_solve(self.lu, self.piv, torch.addcmul(Zb, L.sigma_d, torch.stack(taus), value=-1.0))
        return (nu, Wb, bb, Zb), t_in

    def forward(self, y: Tensor | None, u):
        """The parameters of every layer of the run, and ``y`` at its output."""
        L, eps = self.layers, self.damping
        nu, Wb, bb, Zb = u
        J = L.J
        y = nu.new_zeros(L.n, 1) if y is None else y
        e = (L.sigma_d * nu).unbind(0)
        A, ys = self.A, [y] * J
        for j in range(J - 1):
            y = ys[j + 1] = torch.addmm(e[j], A[j], y)
        y_out = torch.addmm(e[J - 1], A[J - 1], y)
        Y = torch.stack(ys)  # J × n × 1, each layer's input
        # ζ = ν − K y; with s = v_inᵀy and u = ζ − b_ζ/ε + g s/ε the parameters are
        # Θ̃ᵀ = b_⊥/ε + v ζᵀ − C_⊥y/ε, i.e. W = Wb/ε + u v_inᵀ − g yᵀ/ε, bias = bb/ε + v_b u
        zeta = torch.baddbmm(nu, self.K, Y, alpha=-1.0)
        s = L.v_in.mT @ Y  # J × 1 × 1
        u = torch.addcmul(torch.add(zeta, Zb, alpha=-1.0 / eps), L.g, s, value=1.0 / eps)
        theta_W = torch.baddbmm(Wb, torch.cat((u, L.g), dim=2), torch.cat((L.v_in, Y * (-1.0 / eps)), dim=2).mT, beta=1.0 / eps)
        theta_b = torch.addcmul(bb * (1.0 / eps), L.v_bias, u)
        out = torch.cat((theta_W.reshape(J, -1), theta_b.reshape(J, -1)), dim=1)
        return out.reshape(-1, 1), y_out
