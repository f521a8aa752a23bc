"""A run of identical one-sample Linear + activation layers as one stage of the elimination.

A run is ``J ≥ MIN_RUN`` consecutive pairs (``nn.Linear`` at one sample, square ``W``, with
or without a bias; then an elementwise block ``F = diag(d)``, ``E = diag(e)``) of one shape
(:mod:`tallskinny.elimination.runs` finds them; their data is stacked once per curvature
and shared with the batched HVPs). :class:`LinearRunStage` eliminates the whole run:

* its ε-independent data is computed for all layers at once: ``σ_j = ‖x̃_j‖`` (``x̃ = [x; 1]``,
  or ``x̃ = x`` without a bias: then every ``x_j ≠ 0`` is required, :func:`admissible`),
  ``v_j = x̃_j/σ_j`` and ``‖g_j‖²`` (``C_⊥ᵀC_⊥ = ‖g‖²(I − v_in v_inᵀ)`` is applied, not formed);
* the factorization is the Riccati step of :class:`~tallskinny.elimination.stages.affine.AffineStage` at one
  sample (``G_V = σI``) after the activation's ``S ← S ⊙ ddᵀ + diag(e)``, in one loop of
  about a dozen tensor operations per layer (``ddᵀ`` of all layers made before it, ``A``
  below after it):

      Q_ζζ = σ²S + εI     Q_ζy = σ S W + g vᵀ     K = Q_ζζ⁻¹ Q_ζy
      S ← Wᵀ S W − C_⊥ᵀC_⊥/ε − Q_ζyᵀ K

  (``Q_j``, their LU factors and ``K`` written into one buffer each; the pivots of all LU
  factors are tested after the loop, in one synchronisation; the ``Q_j`` are kept for the
  inertia);
* the sweeps of one right-hand side (:class:`BatchedRun`) are linear recurrences. With
  ``N = W − σK`` the backward sweep through layer ``j`` is

      t_j^A = d_j ⊙ τ_j                       (the adjoint at the Linear's output)
      τ_{j−1} = Nᵀ t_j^A + Kᵀ b_ζ + C_⊥ᵀ b_⊥ / ε
      ν_j = Q_ζζ⁻¹ (b_ζ − σ t_j^A)

  and the forward sweep ``y_j = d_j ⊙ (N y_{j−1} + σ ν_j)``, ``ζ_j = ν_j − K y_{j−1}``,
  ``Θ̃ᵀ = b_⊥/ε + v ζᵀ − C_⊥ y/ε``. With ``A = diag(d) N`` the recurrences are
  ``y_j = A_j y_{j−1} + σ d ⊙ ν_j`` and ``τ_{j−1} = A_jᵀ τ_j + h_j``: one matrix-vector
  product per layer and sweep; everything else is one batched operation for the run, on
  the parameters' own layout (``[W | bias]`` or ``W``, no gathers). ``k`` right-hand sides are swept
  one column at a time.

The sums are those of the per-stage elimination (the results agree to rounding); one run
replaces ``2J`` stage objects, their factor records and their per-layer Python calls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...linalg import Inertia, pivot_tolerance
from ...linalg.factor import ldl_positive_count
from .. import workspace
from ..algebra import StageSingular, raise_if_null_directions, scaled_identity
from . import Stage, StageFactor


def admissible(run, J: int) -> bool:
    """Whether the first ``J`` layers of ``run`` can be one stage: ``x̃_j ≠ 0`` for every
    layer (``G_V = σ_j I`` of rank one; always so with a bias, ``x̃ = [x; 1]``). A
    bias-free layer with ``x = 0`` has ``r = 0`` and is left to the per-stage
    elimination."""
    return run.bias or bool((run.x[:J] != 0).any(1).all())


class LinearRunStage(Stage):
    """The stage of blocks ``[start, end)``: ``J`` (Linear, activation) pairs.

    ``run`` is the :class:`~tallskinny.elimination.runs.HVPRun` of (at least) these
    pairs; its first ``J`` layers are used."""

    def __init__(self, run, start: int, J: int):
        self.start, self.end, self.J = start, start + 2 * J, J
        self.blocks = 2 * J
        W, x, d = run.Ws[:J], run.x[:J], run.d[:J]
        self.m, self.n = m, n = W[0].shape
        self.bias = bias = run.bias
        self.p = J * (m * n + m * bias)
        self.n_perp = m * (n + bias - 1)  # per layer: m·(q − r) with q = n + 1 (n without bias), r = 1
        self.W = W
        sigma = ((x * x).sum(1, keepdim=True) + float(bias)).sqrt()  # J × 1 × 1, ‖x̃‖ (> 0: admissible)
        self.sigmas = sigma.reshape(-1).tolist()
        self.neg_sigmas = -sigma  # J × 1 × 1
        self.v_in = x / sigma  # J × n × 1
        self.v_bias = sigma.reciprocal() if bias else None  # J × 1 × 1
        self.sigma_d = sigma * d  # J × m × 1
        self.d = d.squeeze(-1)  # J × m
        self.d_column = d  # J × m × 1
        self.e = None if run.e is None else run.e[:J].squeeze(-1)  # J × m: E = diag(e)
        g = None if run.g is None else run.g[:J]  # None: C = 0 (the Gauss–Newton matrix)
        self.g = g if g is not None else x.new_zeros(J, m, 1)
        # C_⊥ᵀC_⊥ = ‖g‖²(I − v_in v_inᵀ) (None: C = 0); ‖g‖² as numbers, with σ
        self.g_sq = None if g is None else (g * g).sum(1).reshape(-1).tolist()

    def eliminate(self, S: Tensor, damping: float, index: int):
        J = self.J
        last = self.start + 2 * (J - 1)  # the run's last Linear, eliminated first
        if damping == 0.0:  # the complement's pivot is εI = 0 (AffineStage._check_complement)
            raise_if_null_directions(self._complement_curvature(J - 1), last)
            raise StageSingular(last)
        S_out, Q, lus, pivs, Ks, A = self._riccati(S, damping)
        scales = torch.linalg.vector_norm(Q, dim=(-2, -1))  # ‖Q_j‖_F ≥ max|Q_j|, for the pivot test
        bad = _first_small_pivot(lus, scales)
        if bad is not None:
            raise StageSingular(self.start + 2 * bad)
        factor = BatchedRun(self, damping, Q, lus, pivs, Ks, A)
        workspace.recycle(factor, Q, lus._base, Ks._base, A)
        return S_out, factor

    def _complement_curvature(self, j: int) -> Tensor | None:
        """``C_⊥ᵀC_⊥ = ‖g‖²(I − v_in v_inᵀ)`` of layer ``j`` (``None`` where ``C = 0``)."""
        if self.g_sq is None:
            return None
        v = self.v_in[j]
        return torch.addmm(torch.eye(self.n, dtype=v.dtype, device=v.device), v, v.mT, alpha=-1.0) * self.g_sq[j]

    def _riccati(self, S: Tensor, damping: float):
        """The loop over the layers (last first): ``S`` at the run's input, the pivots
        ``Q_j`` (kept for the inertia and the pivot test), their LU factors, ``K`` and
        ``A = diag(d)(W − σK)``."""
        J, m = self.J, self.m
        eye_eps = scaled_identity(m, damping, S.dtype, S.device)
        W, sigmas, g_sq = self.W, self.sigmas, self.g_sq
        # ddᵀ of every activation at once; after the first layer S holds twice the
        # (symmetrised) value Hessian, and ½ is folded into ddᵀ (exact: d_i·(½d_j))
        dd = (self.d.unsqueeze(-1) * (0.5 * self.d).unsqueeze(-2)).unbind(0)
        dd_last = torch.outer(self.d[J - 1], self.d[J - 1])
        # the diagonal added after the activation j: diag(e_j), and −‖g‖²I/ε of the Linear
        # j + 1 (its part of −C_⊥ᵀC_⊥/ε, carried through ⊙ ddᵀ as −‖g‖² d²/ε)
        diag = self.e
        c = None if g_sq is None else [gs / damping for gs in g_sq]
        if c is not None:
            shift = torch.tensor(c[1:] + [0.0], dtype=S.dtype, device=S.device).unsqueeze(-1)
            diag = torch.addcmul(diag if diag is not None else torch.zeros_like(self.d), shift, self.d * self.d, value=-1.0)
        diag = None if diag is None else diag.unbind(0)
        g, v = self.g.unbind(0), self.v_in.unbind(0)
        vt = self.v_in.mT.unbind(0)
        # the pivots, their LU factors and K are written into one buffer each (LU and K
        # column-major as LAPACK makes them: no copies into stacks afterwards)
        # (from the workspace pool: BatchedRun gives them back when it is collected)
        Q = workspace.empty((J, m, m), S)
        lus, Ks = workspace.empty((J, m, m), S).mT, workspace.empty((J, self.n, m), S).mT
        pivs = torch.empty(J, m, dtype=torch.int32, device=S.device)
        info = torch.empty(J, dtype=torch.int32, device=S.device)
        for j in range(J - 1, -1, -1):
            # the activation: S ← S ⊙ ddᵀ + diag(e)
            S = S * (dd_last if j == J - 1 else dd[j])  # symmetric exactly
            if diag is not None:
                S.diagonal().add_(diag[j])
            # the Linear at one sample (G_V = σI): S_new = WᵀSW − ‖g‖²(I − v vᵀ)/ε − …
            # (the −‖g‖²I/ε is added after the next activation, or after the loop)
            s, Wj = sigmas[j], W[j]
            SW = S @ Wj
            S_new = Wj.mT @ SW
            if c is not None:
                S_new.addmm_(v[j], vt[j], alpha=c[j])
            torch.add(eye_eps, S, alpha=s * s, out=Q[j])
            Q_ry = SW * s if g_sq is None else torch.addmm(SW, g[j], vt[j], beta=s)
            lu, piv, _ = torch.linalg.lu_factor_ex(Q[j], out=(lus[j], pivs[j], info[j]))
            K = torch.linalg.lu_solve(lu, piv, Q_ry, out=Ks[j])
            # re-symmetrised at every layer (Q_ζyᵀQ_ζζ⁻¹Q_ζy of a slightly nonsymmetric S
            # amplifies the antisymmetric part): S + Sᵀ, halved by the next layer's ddᵀ
            S_new.addmm_(Q_ry.mT, K, alpha=-1.0)
            S = S_new + S_new.mT
        S = S * 0.5
        if c is not None:
            S.diagonal().sub_(c[0])
        A = workspace.empty((J, m, self.n), S)  # diag(d)(W − σK), for the sweeps
        torch.stack(W, out=A).addcmul_(Ks, self.neg_sigmas).mul_(self.d_column)
        return S, Q, lus, pivs, Ks, A


def _first_small_pivot(lu: Tensor, scales: Tensor) -> int | None:
    """The largest ``j`` (the first eliminated) whose LU has a pivot at or below
    ``pivot_tolerance(m, dtype, scales[j])`` (a non-finite pivot counts too), or ``None``:
    one synchronisation for the run. The run passes ``scales[j] = ‖Q_j‖_F``, at most
    ``m`` times the ``max|Q_j|`` of the per-stage test (one reduction per layer instead of
    two; a larger scale only makes the test stricter, and a stage it rejects goes to the
    pivoted KKT factorization)."""
    pivots = lu.diagonal(dim1=-2, dim2=-1).abs().amin(-1)
    ok = pivots > pivot_tolerance(lu.shape[-1], lu.dtype, 1.0) * scales  # NaN compares False
    if bool(ok.all()):
        return None
    return int((~ok).nonzero().max())


class BatchedRun(StageFactor):
    """The factors of a run at one damping: sweeps, inertia and ``log|det|``."""

    writes_in_place = True

    def __init__(self, stage: LinearRunStage, damping: float, pivots: Tensor, lu: Tensor, piv: Tensor, K: Tensor, A: Tensor):
        self.layers = stage
        self.damping = damping
        self.pivots = pivots  # the Q_j (J × m × m), for the inertia
        self.lu, self.piv, self.K = lu, piv, K
        # A = diag(d)(W − σK) (made by the Riccati loop); the backward recurrence uses Aᵀ
        self.A = A.unbind(0)
        self._inertia = None

    @property
    def logdet(self) -> Tensor:
        """``Σ_j log|det Q_ζζ,j| + J·n_⊥·log ε``."""
        L = self.layers
        span = self.lu.diagonal(dim1=-2, dim2=-1).abs().log().sum()
        return span + L.J * L.n_perp * math.log(abs(self.damping))

    @property
    def inertia(self) -> Inertia:
        """``Σ_j inertia(Q_ζζ,j)`` (Bunch–Kaufman ``LDLᵀ`` of the kept pivots, all at once)
        and ``ε > 0`` on the complements."""
        if self._inertia is None:
            L = self.layers
            ld, piv, _ = torch.linalg.ldl_factor_ex(self.pivots)
            positive = int(ldl_positive_count(ld, piv).sum())  # all J at once
            rest = L.J * L.n_perp  # pivots ε: negative for a shift (ε < 0)
            negative = L.J * L.m - positive
            self._inertia = Inertia(positive + rest, negative, 0) if self.damping > 0 else Inertia(positive, negative + rest, 0)
        return self._inertia

    def _split(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """``b`` of the run (one column) as ``W``-shaped (``J × m × n``) and bias
        (``J × m × 1``; ``None`` without a bias) views."""
        L = self.layers
        b = b.reshape(L.J, L.p // L.J)
        mn = L.m * L.n
        return b[:, :mn].reshape(L.J, L.m, L.n), (b[:, mn:].unsqueeze(-1) if L.bias else None)

    def backward(self, t: Tensor | None, b: Tensor):
        """What the forward sweep needs, and the adjoint ``t`` at the run's input."""
        if b.shape[1] == 1:
            return self._backward(t, b)
        return self._backward_columns(t, b)

    def forward(self, y: Tensor | None, u, out: Tensor | None = None):
        """The parameters of every layer of the run (written into ``out``, ``(p, k)``, if
        given), and ``y`` at its output."""
        L = self.layers
        k = u[0].shape[-1]  # ν: J × m × k
        if out is None or not out.is_contiguous():
            theta = (y if y is not None else self.K).new_empty(L.p, k)
            y_out = self._forward(y, u, theta) if k == 1 else self._forward_columns(y, u, theta)
            if out is None:
                return theta, y_out
            out.copy_(theta)
            return out, y_out
        return out, (self._forward(y, u, out) if k == 1 else self._forward_columns(y, u, out))

    def _adjoint_recurrence(self, h, tau: Tensor) -> tuple[Tensor, Tensor]:
        """``τ_{j−1} = A_jᵀ τ_j + h_j`` from ``τ_J = tau`` (``m × k``): the stacked
        ``τ_1 … τ_J`` and ``τ_0``, the adjoint at the run's input (fresh results: cheaper
        than ``out=`` into a buffer)."""
        A, J = self.A, len(h)
        taus = [tau] * J
        for j in range(J - 1, 0, -1):
            tau = taus[j - 1] = torch.addmm(h[j], A[j].mT, tau)
        return torch.stack(taus), torch.addmm(h[0], A[0].mT, tau)

    def _tangent_recurrence(self, e, y: Tensor) -> tuple[Tensor, Tensor]:
        """``y_{j+1} = A_j y_j + e_j`` from ``y_0 = y`` (``n × k``): the stacked inputs
        ``y_0 … y_{J−1}`` of the layers and the run's output ``y_J``."""
        A, J = self.A, len(e)
        ys = [y] * J
        for j in range(J - 1):
            y = ys[j + 1] = torch.addmm(e[j], A[j], y)
        return torch.stack(ys), torch.addmm(e[J - 1], A[J - 1], y)

    def _backward(self, t: Tensor | None, b: Tensor):
        """``ν`` of every layer, and the adjoint ``t`` at the run's input (one column)."""
        L, eps = self.layers, self.damping
        Wb, bb = self._split(b)
        # b_ζ = Θ̃_b v (J × m × 1) and h = Kᵀ b_ζ + C_⊥ᵀ b_⊥ / ε, where for
        # b_⊥ = Θ̃_b − b_ζ vᵀ: C_⊥ᵀ b_⊥ = Wbᵀ g − v_in (gᵀ b_ζ)
        Zb = Wb @ L.v_in if bb is None else torch.baddbmm(bb * L.v_bias, Wb, L.v_in)
        c = torch.baddbmm(Wb.mT @ L.g, L.v_in, L.g.mT @ Zb, alpha=-1.0)
        h = torch.baddbmm(c, self.K.mT, Zb, beta=1.0 / eps).unbind(0)
        taus, t_in = self._adjoint_recurrence(h, b.new_zeros(L.m, 1) if t is None else t)
        # ν = Q_ζζ⁻¹(b_ζ − σ d ⊙ τ)
        nu = torch.linalg.lu_solve(self.lu, self.piv, torch.addcmul(Zb, L.sigma_d, taus, value=-1.0))
        return (nu, Wb, bb, Zb), t_in

    def _forward(self, y: Tensor | None, u, out: Tensor) -> Tensor:
        """One column: the parameters into the contiguous ``(p, 1)`` tensor ``out``; returns
        ``y`` at the run's output."""
        L, eps = self.layers, self.damping
        nu, Wb, bb, Zb = u
        J = L.J
        Y, y_out = self._tangent_recurrence((L.sigma_d * nu).unbind(0), nu.new_zeros(L.n, 1) if y is None else y)
        # ζ = ν − K y; with s = v_inᵀy and u = ζ − b_ζ/ε + g s/ε the parameters are
        # Θ̃ᵀ = b_⊥/ε + v ζᵀ − C_⊥y/ε, i.e. W = Wb/ε + u v_inᵀ − g yᵀ/ε, bias = bb/ε + v_b u
        zeta = torch.baddbmm(nu, self.K, Y, alpha=-1.0)
        s = L.v_in.mT @ Y  # J × 1 × 1
        u = torch.addcmul(torch.add(zeta, Zb, alpha=-1.0 / eps), L.g, s, value=1.0 / eps)
        o = out.view(J, -1)  # views of out (.view: never a silent copy), written in place
        theta_W = o[:, : L.m * L.n].view(J, L.m, L.n)
        torch.baddbmm(Wb, torch.cat((u, L.g), dim=2), torch.cat((L.v_in, Y * (-1.0 / eps)), dim=2).mT, beta=1.0 / eps, out=theta_W)
        if bb is not None:
            torch.addcmul(bb * (1.0 / eps), L.v_bias, u, out=o[:, L.m * L.n :].unsqueeze(-1))
        return y_out

    def _backward_columns(self, t: Tensor | None, b: Tensor):
        """:meth:`_backward` for ``k > 1`` columns at once: the recurrence is one
        ``m × k`` product per layer (not ``k`` matrix-vector products), the rest batched
        over layers with the columns last (``b`` read as ``J × (m·n + m) × k``)."""
        L, eps = self.layers, self.damping
        J, m, n, k = L.J, L.m, L.n, b.shape[1]
        bv = b.reshape(J, L.p // J, k)
        Wb = bv[:, : m * n].reshape(J, m, n, k)
        bb = bv[:, m * n :] if L.bias else None  # J × m × k
        Zb = (Wb * L.v_in.reshape(J, 1, n, 1)).sum(2)  # Θ̃_b v, column by column (3× J·m tiny matmuls)
        if bb is not None:
            Zb = torch.addcmul(Zb, bb, L.v_bias)
        WbTg = (Wb * L.g.reshape(J, m, 1, 1)).sum(1)  # Wbᵀ g, J × n × k
        c = torch.baddbmm(WbTg, L.v_in, L.g.mT @ Zb, alpha=-1.0)
        h = torch.baddbmm(c, self.K.mT, Zb, beta=1.0 / eps).unbind(0)
        taus, t_in = self._adjoint_recurrence(h, b.new_zeros(m, k) if t is None else t)
        nu = torch.linalg.lu_solve(self.lu, self.piv, torch.addcmul(Zb, L.sigma_d, taus, value=-1.0))
        return (nu, Wb, bb, Zb), t_in

    def _forward_columns(self, y: Tensor | None, u, out: Tensor) -> Tensor:
        """:meth:`_forward` for ``k > 1`` columns into the contiguous ``(p, k)`` ``out``."""
        L, eps = self.layers, self.damping
        nu, Wb, bb, Zb = u
        J, m, n, k = L.J, L.m, L.n, nu.shape[-1]
        Y, y_out = self._tangent_recurrence((L.sigma_d * nu).unbind(0), nu.new_zeros(n, k) if y is None else y)
        zeta = torch.baddbmm(nu, self.K, Y, alpha=-1.0)
        s = L.v_in.mT @ Y  # J × 1 × k
        u = torch.addcmul(torch.add(zeta, Zb, alpha=-1.0 / eps), L.g, s, value=1.0 / eps)
        o = out.view(J, L.p // J, k)
        # W = Wb/ε + u v_inᵀ − g yᵀ/ε for every column (J × m × n × k)
        theta_W = o[:, : m * n].view(J, m, n, k)
        torch.mul(u.unsqueeze(2), L.v_in.reshape(J, 1, n, 1), out=theta_W)
        theta_W.addcmul_(L.g.reshape(J, m, 1, 1), Y.unsqueeze(1), value=-1.0 / eps)
        theta_W.add_(Wb, alpha=1.0 / eps)
        if bb is not None:
            torch.addcmul(bb * (1.0 / eps), L.v_bias, u, out=o[:, m * n :])
        return y_out
