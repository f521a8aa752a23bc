"""The span stage of an affine block whose ``C`` is general: eliminated through an inner
dense stage on the span ``Z``."""

from __future__ import annotations

import torch
from torch import Tensor

from ...blocks.protocol import Oracle
from ...linalg import Dense, Identity, Inertia, Zero
from ...linalg.kronecker import Kronecker, Permutation, Product, kron, transpose_permutation
from ..algebra import symmetrize
from ..structure import channels_first
from ..supported import Supported, dense
from . import Stage, StageFactor
from .activation import NoParameters
from .affine import AffineCoordinates, plus_complement_logdet, with_complement
from .dense import DenseStage


class ReducedAffineStage(AffineCoordinates, Stage):
    """A block affine in its parameters: exact complement ⊕ a dense stage on the span
    (for the last block, where the span stage also drops the loss's null space)."""

    def __init__(self, oracle: Oracle, parts, **dense_options):
        p_out, X, _, Gam, _, _ = parts
        XV = self._setup(oracle, parts)
        R, m, r = self.R, self.m, self.r
        # the span coordinates ζ of Θ̃ = Z Vᵀ: vec(Zᵀ), ordered (k, i), or, where the
        # output is ordered channel-major (P_out = I, a convolution at one sample), vec(Z)
        # ordered (i, k), so that G_V = I_m ⊗ X̃V is applied without any permutation
        self.channel_major = channels_first(parts)
        span_order = transpose_permutation(m, r, device=X.device)  # (i, k) → (k, i)
        if R == 1:  # tiny: one dense matrix is cheapest
            GV = Dense(kron(torch.eye(m, dtype=X.dtype, device=X.device), XV)[p_out][:, span_order])
        elif self.channel_major:
            GV = Kronecker(Identity(m, dtype=X.dtype, device=X.device), Dense(XV))
        else:  # G V = P_out (I_m ⊗ X̃V) Π: products cost O(a·R·r) instead of O(a²·m·r)
            GV = Product(
                Permutation(p_out, dtype=X.dtype),
                Kronecker(Identity(m, dtype=X.dtype, device=X.device), Dense(XV)),
                Permutation(transpose_permutation(r, m, device=X.device), dtype=X.dtype),  # ζ(i,k) → (k,i)
            )
        a_in = oracle.F.shape[1]
        order = (lambda M: M) if self.channel_major else (lambda M: M[span_order])
        # C_⊥ᵀC_⊥ is subtracted with the inner stage's own rest (one product, on its live
        # inputs) where C_⊥ has rows of its own (a general C); else it is formed here,
        # symmetric bit for bit, so that subtracting it keeps the inner S symmetric
        complement_rows = self.C_perp_coef if self.n_perp and self.coupled else None
        if self.n_perp and self.coupled and complement_rows is None:
            self._CtC = symmetrize(self.CtC)
        if self.C_span is not None:
            C_r = Dense(self._to_span(self.C_span, a_in))
        elif Gam is None:
            C_r = Zero(m * r, a_in, dtype=X.dtype, device=X.device)
        else:
            C_r = Dense(order(kron(Gam, self.VtE)))  # m·r × a_in
        reduced = Oracle(
            G=GV,
            F=oracle.F,
            A=Zero(m * r, m * r, dtype=X.dtype, device=X.device),
            C=C_r,
            E=oracle.E,
        )
        # the span stage: a dense stage with orthogonal columns (dense_options: what it may
        # drop next to ReLUs or the loss), or none where no parameter is left
        if not reduced.G.shape[1]:
            self.inner = NoParameters(reduced)
            complement_rows = None
        else:
            self.inner = DenseStage(reduced, **dense_options, orthogonal_columns=True, complement_rows=complement_rows)
        #: the inner stage subtracts C_⊥ᵀC_⊥/ε (only the check at ε = 0 is left here)
        self.complement_inside = complement_rows is not None

    def _to_span(self, Zb: Tensor, k: int) -> Tensor:
        """``r × (m·k)`` span parts (ordered ``(k, i)``) as the inner stage's ``ζ``."""
        if self.channel_major:
            return Zb.reshape(self.r, self.m, k).transpose(0, 1).reshape(-1, k)
        return Zb.reshape(-1, k)

    def _from_span(self, zeta: Tensor) -> Tensor:
        """The inner stage's ``ζ`` (``m·r × k``) as an ``r × (m·k)`` matrix."""
        if self.channel_major:
            k = zeta.shape[1]
            return zeta.reshape(self.m, self.r, k).transpose(0, 1).reshape(self.r, -1)
        return zeta.reshape(self.r, -1)

    # -- elimination ------------------------------------------------------------------------
    @property
    def takes_supported(self) -> bool:
        return self.inner.takes_supported

    def eliminate(self, S: Tensor | Supported, damping: float, index: int):
        # the inner stage's S is symmetric, and so is C_⊥ᵀC_⊥: so is their difference
        S_new, inner = self.inner.eliminate(S, damping, index)
        if self.complement_inside:
            self._check_complement(damping, index)
        else:
            S_new = self._complement(dense(S_new), damping, index)
        return S_new, ReducedAffineFactor(self, inner, damping)


class ReducedAffineFactor(StageFactor):
    __slots__ = ("stage", "inner", "damping")

    def __init__(self, stage, inner, damping):
        self.stage, self.inner, self.damping = stage, inner, damping

    @property
    def inertia(self) -> Inertia:
        return with_complement(
            self.inner.inertia if self.inner is not None else None, self.stage.n_perp, self.damping
        )

    @property
    def logdet(self) -> Tensor:
        span = self.inner.logdet if self.inner is not None else None
        return plus_complement_logdet(span, self.stage.n_perp, self.damping)

    def pivot_factors(self) -> tuple:
        return self.inner.pivot_factors() if self.inner is not None else ()

    def span_pivot(self):
        return self.inner.span_pivot() if self.inner is not None else None

    def backward(self, t: Tensor | None, b: Tensor):
        st = self.stage
        k = b.shape[1]
        T = st._tilde(b)  # q × (m·k)
        Zb = st.Vt @ T  # r × (m·k): the span part, ordered (i, k)
        b_perp = T - st.V @ Zb if st.n_perp else None
        if self.inner is not None:
            u, t_new = self.inner.backward(t, st._to_span(Zb, k))
        else:
            u, t_new = None, None if t is None else st.F.T.matmat(t)
        if b_perp is not None and st.coupled:
            extra = st._c_t(b_perp, k) / self.damping  # −C_⊥ᵀ u_⊥ with u_⊥ = −b_⊥/ε
            t_new = extra if t_new is None else t_new + extra
        return (u, b_perp, k), t_new

    def forward(self, y: Tensor | None, u):
        st = self.stage
        u_inner, b_perp, k = u
        if self.inner is not None:
            theta_z, y_new = self.inner.forward(y, u_inner)
            T = st.V @ st._from_span(theta_z)
        else:
            T, y_new = None, None if y is None else st.F.matmat(y)
        if b_perp is not None:
            perp = b_perp if y is None or not st.coupled else b_perp - st._c_perp(y)
            perp = perp / self.damping
            T = perp if T is None else T + perp
        return st._untilde(T, k), y_new
