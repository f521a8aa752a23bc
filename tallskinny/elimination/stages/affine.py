"""The structured stage for blocks that are affine in their parameters (Linear-type).

Such a block's oracle says, with :mod:`tallskinny.linalg` operators,

    G = P_out · (I_m ⊗ X̃) · P_θ        C = P_θᵀ · (Γ ⊗ Ẽ)        A = 0

that is: with ``Θ̃ = P_θ θ`` read as an ``m × q`` matrix, the output is
``vec(Θ̃ X̃ᵀ)`` (``X̃`` the ``R × q`` matrix of the rows the parameters act on, e.g.
the samples' inputs with a column of ones for the bias), reordered by ``P_out``; and
``θᵀ C y = ⟨Θ̃, Γ Y Ẽᵀ⟩`` for an input perturbation ``Y`` (``R × n``).

With the thin SVD ``X̃ = U Σ Vᵀ`` (rank ``r``, computed once), ``Θ̃ = Z Vᵀ + Θ̃_⊥`` splits
parameter space into the span ``Z`` (``m·r`` numbers, at most the block's output size)
and its complement, on which ``G`` vanishes exactly and ``Q_θθ = εI``. The complement is
eliminated in closed form (it adds ``−(ΓᵀΓ ⊗ P̄)/ε`` to the value Hessian, where
``P̄ = Ẽᵀ(I − VVᵀ)Ẽ``); the span is an ordinary dense stage of size ``m·r``. Nothing of
size ``p × p`` or ``p × a`` is formed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...blocks.protocol import Oracle
from ...linalg import Dense, Inertia, Zero, pivot_tolerance
from ...linalg.kronecker import identity_kronecker_factor, kron, padded_identity_matrix
from ...linalg.thin import thin_addmm, thin_product
from .. import workspace
from ..algebra import (
    StageSingular,
    SymmetricFactor,
    congruence,
    plus,
    raise_if_null_directions,
    scaled_identity,
    symmetrize,
    symmetrized,
)
from ..compiled import CompiledOracle
from ..structure import padded_identity, transposed_order
from . import Stage, StageFactor


def _complement_basis(V: Tensor) -> Tensor:
    """An orthonormal basis of the orthogonal complement of the orthonormal columns ``V``."""
    Q, _ = torch.linalg.qr(V, mode="complete")
    return Q[:, V.shape[1]:]


class AffineCoordinates:
    """What both affine stages share: the SVD of ``X̃``, the complement's curvature
    ``C_⊥ᵀC_⊥ = ΓᵀΓ ⊗ P̄`` and the ``Θ̃ᵀ`` coordinates of the parameters."""

    def _setup(self, oracle: Oracle, parts) -> Tensor:
        p_out, X, p_theta, Gam, Et, C_general = parts
        R, q = X.shape
        m = oracle.G.shape[0] // R
        self.p = oracle.G.shape[1]
        self._CtC_factors: tuple[Tensor, Tensor] | None = None
        self._PE: Tensor | None = None  # (I − VVᵀ)Ẽ, made on first use (batched runs do without)
        self.F, self.FT = oracle.F, oracle.F.T
        self.R, self.m, self.q = R, m, q
        # Θ̃ is handled transposed, as a q × (m·k) matrix, so that every product with V, Ẽ
        # is one 2-D matrix product: T = (P_θ' b).reshape(q, m·k) with P_θ' = P_θ transposed
        self.order, self.order_inv = transposed_order(p_theta, m, q)
        g_sq = None
        self.sigma = None  # ‖x̃‖ at one sample
        if R == 1:  # the thin SVD of one row: V = x̃ᵀ/‖x̃‖, X̃V = ‖x̃‖
            norm = torch.linalg.vector_norm
            if Gam is None:
                sigma = float(norm(X))
            else:  # ‖g‖ as well, in the same synchronisation
                sigma, g_norm = torch.stack((norm(X), norm(Gam))).tolist()
                g_sq = g_norm * g_norm
            r = int(sigma > 0.0)
            self.sigma = sigma
            Vh = X / sigma if r else X[:0]
            XV = X.new_full((1, r), sigma)
        else:
            U, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
            tol = pivot_tolerance(max(R, q), X.dtype, float(sigma[0]) if sigma.numel() else 0.0)
            r = int((sigma > tol).sum())
            Vh, XV = Vh[:r], U[:, :r] * sigma[:r]
        self.r = r
        self.Vt = Vh  # r × q
        self.V = Vh.mT
        self.Gam, self.Et = Gam, Et
        # Ẽ = [I; 0] (a Linear layer's input padded by the bias column) or Ẽ = I (no bias):
        # slicing suffices
        self.pad = padded_identity(Et)  # also Ẽ = I (bias-free): the slices below are then whole
        self.coupled = Gam is not None or C_general is not None  # C ≠ 0
        self.C_perp_coef = self.V_perp = self.C_span = self.g_sq = None
        if C_general is not None:
            # C densely, in Θ̃ᵀ coordinates: rows (c, i), one column per input entry
            a_in = C_general.shape[1]
            T_C = C_general.dense_block(self.order).reshape(q, m * a_in)
            VtT = self.Vt @ T_C
            self.C_span = VtT.reshape(r * m, a_in)  # rows ζ = (k, i)
            if q > r:
                # C_⊥ in the coordinates of an orthonormal basis V_⊥ of the complement:
                # C_⊥ = (V_⊥ ⊗ I)·C_c with C_c = V_⊥ᵀT_C of m·(q − r) rows, so
                # C_⊥ᵀC_⊥ = C_cᵀC_c costs a_in²·m·(q − r), not a_in²·m·q
                self.V_perp = _complement_basis(self.V)
                self.C_perp_coef = (self.V_perp.mT @ T_C).reshape((q - r) * m, a_in)
            self._CtC = None  # formed on first use (a span stage may take C_c's rows instead)
        elif Gam is None:
            self._CtC = None
        else:
            n = Et.shape[1]
            self.VtE = self.Vt[:, :n] if self.pad else self.Vt @ Et  # r × n
            self._CtC = None  # formed on first use
            # one sample, Ẽ = [I; 0]: C_⊥ᵀC_⊥ = ‖g‖²(I − (VᵀẼ)ᵀVᵀẼ)
            self.g_sq = g_sq if self.pad else None
        self.n_perp = m * (q - r)
        return XV  # R × r

    @property
    def CtC(self) -> Tensor | None:
        """``C_⊥ᵀC_⊥ = ΓᵀΓ ⊗ P̄`` with ``P̄ = Ẽᵀ(I − VVᵀ)Ẽ`` (``a_in × a_in``, formed on first
        use), or ``C_cᵀC_c`` for a general ``C`` (symmetric bit for bit)."""
        if self._CtC is None and self.C_perp_coef is not None:
            self._CtC = symmetrize(self.C_perp_coef.mT @ self.C_perp_coef)
        elif self._CtC is None and self.Gam is not None:
            VtE = self.VtE
            if self.g_sq is not None:  # one sample, Ẽ = [I; 0]: ‖g‖²(I − (VᵀẼ)ᵀVᵀẼ)
                n = VtE.shape[1]
                eye = padded_identity_matrix(n, n, VtE.dtype, VtE.device)
                self._CtC = torch.addmm(eye, VtE.mT, VtE, beta=self.g_sq, alpha=-self.g_sq)
            else:
                self._CtC = kron(*self._complement_factors())
        return self._CtC

    def _complement_factors(self) -> tuple[Tensor, Tensor]:
        """``ΓᵀΓ`` and ``P̄ = ẼᵀẼ − (VᵀẼ)ᵀVᵀẼ``, the factors of ``C_⊥ᵀC_⊥ = ΓᵀΓ ⊗ P̄``
        (made on first use)."""
        if self._CtC_factors is None:
            self._CtC_factors = (self.Gam.mT @ self.Gam, self.Et.mT @ self.Et - self.VtE.mT @ self.VtE)
        return self._CtC_factors

    @property
    def PE(self) -> Tensor:
        """``(I − VVᵀ)Ẽ`` (``q × n``): ``C_⊥y = ((I − vvᵀ)Ẽ y) gᵀ`` at one sample, and the
        projection of :meth:`_c_perp` at several."""
        if self._PE is None:
            self._PE = torch.addmm(self.Et, self.V, self.VtE, alpha=-1.0)
        return self._PE

    # -- coordinates: Θ̃ᵀ as a q × (m·k) matrix ------------------------------------------------
    def _tilde(self, b: Tensor) -> Tensor:
        return b.index_select(0, self.order).reshape(self.q, -1)

    def _untilde(self, T: Tensor, k: int) -> Tensor:
        return T.reshape(self.q * self.m, k).index_select(0, self.order_inv)

    def _c_perp(self, y: Tensor) -> Tensor:
        """``(C_⊥ y)ᵀ = (I − VVᵀ) Ẽ Yᵀ Γᵀ`` as a ``q × (m·k)`` matrix."""
        if self.C_span is not None:
            return self.V_perp @ (self.C_perp_coef @ y).reshape(self.q - self.r, -1)
        R, n, k = self.Gam.shape[1], self.Et.shape[1], y.shape[1]
        M = (self.Gam @ y.reshape(R, n * k)).reshape(self.m, n, k).transpose(0, 1).reshape(n, -1)
        return self.PE @ M  # (I − VVᵀ)Ẽ M

    def _c_t(self, T: Tensor, k: int) -> Tensor:
        """``Cᵀ`` applied to a ``q × (m·k)`` matrix ``Θ̃ᵀ``: ``Γᵀ Θ̃ Ẽ``, flattened ``(R·n, k)``
        (of a complement direction: ``C`` and ``C_⊥`` agree there)."""
        if self.C_span is not None:  # C_⊥ᵀ vec(T) = C_cᵀ vec(V_⊥ᵀT)
            return self.C_perp_coef.mT @ (self.V_perp.mT @ T).reshape(-1, k)
        n = self.Et.shape[1]
        M = T[:n] if self.pad else self.Et.mT @ T  # n × (m·k)
        if k == 1:  # Γᵀ (Θ̃ Ẽ), Θ̃Ẽ = Mᵀ a view
            return (self.Gam.mT @ M.mT).reshape(-1, 1)
        M = M.reshape(n, self.m, k).transpose(0, 1).reshape(self.m, n * k)
        return (self.Gam.mT @ M).reshape(-1, k)

    def _check_complement(self, damping: float, index: int) -> None:
        """At ``ε = 0`` the complement's pivot ``Q_θθ = εI`` is zero: say why, or hand over."""
        if self.n_perp and damping == 0.0:
            raise_if_null_directions(self.CtC, index)
            raise StageSingular(index)

    def _complement(self, S_new: Tensor, damping: float, index: int) -> Tensor:
        """``S ← S − C_⊥ᵀC_⊥/ε`` (``Q_θθ = εI`` on the complement)."""
        self._check_complement(damping, index)
        if self.n_perp and self.coupled:
            S_new = torch.add(S_new, self.CtC, alpha=-1.0 / damping)
        return S_new


class AffineStage(AffineCoordinates, Stage):
    """A block affine in its parameters, eliminated directly in span coordinates.

    With ``Y_out = X̃V·Zᵀ`` (``R × m``, samples first) the span part of ``G`` is
    ``G_V = X̃V ⊗ I_m`` for ``ζ = vec(Zᵀ)``, so with ``S`` read as ``(R, m, R, m)``

        Q_ζζ = G_VᵀSG_V + εI        Q_ζy = C_V + G_VᵀS F        C_V = VᵀẼ ⊗ Γ (reordered)

    are contractions of ``S`` with ``X̃V`` (at one sample, ``G_V = ‖x̃‖·I``). Needs the
    output ordered sample-major (``P_out`` the transpose of ``m × R``).
    """

    def __init__(self, oracle: Oracle, parts, compiled=None):
        XV = self._setup(oracle, parts)
        self.XV, self.XVt = XV, XV.mT
        R, m, r = self.R, self.m, self.r
        self.scalar = self.sigma if R == 1 and r == 1 else None  # G_V = σ·I
        self.E = oracle.E
        self._compiled = compiled if compiled is not None else CompiledOracle(oracle)
        # one sample, F = W: the products of the sweeps fuse into a few matmuls
        # (any dense F of one sample works the same way, e.g. a residual unit's I + W·D_σ)
        self.W = None
        if self.scalar is not None:
            self.W = identity_kronecker_factor(oracle.F)
            if self.W is None and isinstance(oracle.F, Dense):
                self.W = oracle.F.matrix
        if self.C_span is not None:
            self.C_r = self.C_span if r else None
        elif self.Gam is None or not r:
            self.C_r = None
        elif R == 1 and r == 1:  # C_V = Γ (VᵀẼ): m × n
            self.C_r = self.Gam @ self.VtE
        else:  # C_V[(k,i),(s,j)] = (VᵀẼ)[k,j] Γ[i,s]
            n = self.VtE.shape[1]
            self.C_r = (self.VtE[:, None, None, :] * self.Gam[None, :, :, None]).reshape(r * m, R * n)
        # several samples, F = I_R ⊗ W (a Linear layer): the stage's products are matrix
        # products on views of contiguous tensors (:meth:`_eliminate_kronecker`)
        self.kron_W = identity_kronecker_factor(oracle.F) if self.W is None and r else None
        self.E_dense = None if self.W is None or isinstance(oracle.E, Zero) else oracle.E.to_dense()
        # one sample, Ẽ = [I; 0], Γ = g (m × 1): for Θ̃ᵀ of a complement direction
        # C_⊥ᵀθ = (Θ̃ᵀ)[:n] g, and C_⊥y = ((I − vvᵀ)Ẽ y) gᵀ as a q × m matrix
        self.fused = self.W is not None and self.Gam is not None and self.pad
        if self.fused:
            self.g = self.Gam  # m × 1

    @property
    def linear(self) -> tuple | None:
        """``(W, x, g)`` where the block is an ``nn.Linear`` at one sample (with a bias,
        ``F = W``), else ``None`` (:attr:`tallskinny.elimination.compiled.CompiledOracle.linear`)."""
        return self._compiled.linear

    @property
    def F_apply(self):
        """``y ↦ F y`` (``None`` for ``F = 0``), made on first use."""
        return self._compiled.F

    @property
    def FT_apply(self):
        return self._compiled.FT

    # -- G_V and its transpose on (R·m, k) / (r·m, k) tensors ---------------------------------
    def _gv(self, z: Tensor) -> Tensor:
        if self.scalar is not None:
            return self.scalar * z
        k = z.shape[1]
        return (self.XV @ z.reshape(self.r, -1)).reshape(self.R * self.m, k)

    def _gvt(self, t: Tensor) -> Tensor:
        if self.scalar is not None:
            return self.scalar * t
        k = t.shape[1]
        return (self.XVt @ t.reshape(self.R, -1)).reshape(self.r * self.m, k)

    def _s_gv(self, S: Tensor) -> Tensor:
        """``S G_V`` (``a × r·m``)."""
        if self.scalar is not None:
            return self.scalar * S
        a, R, m, r = S.shape[0], self.R, self.m, self.r
        T = S.reshape(a, R, m).transpose(1, 2) @ self.XV  # (a, m, r)
        return T.transpose(1, 2).reshape(a, r * m)

    # -- elimination ------------------------------------------------------------------------
    def eliminate(self, S: Tensor, damping: float, index: int):
        factor = Q_ry = K = None
        if self.W is not None:
            # one sample: Q_ζζ = σ²S + εI, Q_ζy = σ S W + C_V, and
            # S ← E + WᵀSW − C_⊥ᵀC_⊥/ε − Q_ζyᵀ Q_ζζ⁻¹ Q_ζy: six products, the factor's
            # pivots tested later with all others (no synchronisation here)
            W, sigma = self.W, self.scalar
            SW = S @ W
            S_new = self._value_hessian_base(W.mT, SW, damping, index)
            Q_rr = torch.add(scaled_identity(S.shape[0], damping, S.dtype, S.device), S, alpha=sigma * sigma)
            Q_ry = SW * sigma if self.C_r is None else torch.add(self.C_r, SW, alpha=sigma)
            factor = SymmetricFactor.unchecked(Q_rr)
            K = factor.solve(Q_ry)
            # re-symmetrised at every stage: Q_ζyᵀQ_ζζ⁻¹Q_ζy of a slightly nonsymmetric S
            # amplifies the antisymmetric part
            return symmetrize(S_new.addmm_(Q_ry.mT, K, alpha=-1.0)), DirectAffineFactor(self, damping, factor, Q_ry, K)
        if self.kron_W is not None:
            return self._eliminate_kronecker(S, damping, index)
        S_new = plus(self.E, congruence(self.F, S))
        if self.r:
            SGV = self._s_gv(S)
            Q_rr = self._gvt(SGV)
            Q_rr.diagonal().add_(damping)
            Q_ry = self.FT_apply(SGV).mT
            if self.C_r is not None:
                Q_ry = Q_ry + self.C_r
            factor = SymmetricFactor.of(Q_rr)  # large pivots: Cholesky where it applies
            if factor is None:
                raise StageSingular(index)
            K = factor.solve(Q_ry)
            S_new = S_new - Q_ry.mT @ K
        S_new = self._complement(S_new, damping, index)
        return symmetrize(S_new), DirectAffineFactor(self, damping, factor, Q_ry, K)

    def _eliminate_kronecker(self, S: Tensor, damping: float, index: int):
        """The stage at ``F = I_R ⊗ W`` (``S`` is ``(R·m)²``, read as ``(R, m, R, m)``):

            G_VᵀS = (X̃Vᵀ ⊗ I) S               one product with S read as R × (m·a)
            Q_ζζ = (G_VᵀS) G_V + εI            X̃Vᵀ on each row's (R, m) block (batched)
            Q_ζy = (G_VᵀS) F + C_V             W on each (·, m) block: one product
            S ← FᵀSF + E − C_⊥ᵀC_⊥/ε − Q_ζyᵀ Q_ζζ⁻¹ Q_ζy

        Every product reads contiguous views (no transposed copies of ``a × a`` matrices)
        and the updates are in place (on large ``a`` a fresh ``a × a`` buffer costs page
        faults comparable to its arithmetic)."""
        W, XVt, R, m, r = self.kron_W, self.XVt, self.R, self.m, self.r
        n, a, rm = W.shape[1], S.shape[0], self.r * self.m
        self._check_complement(damping, index)
        # the scratch products G_VᵀS and S F, and the new S, in buffers of the workspace pool
        GtS = workspace.empty((rm, a), S)  # rows ζ = (k, i)
        torch.mm(XVt, S.reshape(R, m * a), out=GtS.view(r, m * a))
        Q_rr = torch.bmm(XVt.expand(rm, r, R), GtS.view(rm, R, m)).view(rm, rm)
        Q_rr.diagonal().add_(damping)
        # Q_ζy is kept for the backward sweep (Q_ζyᵀν) rather than applying Kᵀ: K carries
        # errors of eps·cond(Q_ζζ) that Q_ζyᵀ(Q_ζζ⁻¹ν) of one vector does not
        Q_ry = (GtS.view(rm * R, m) @ W).view(rm, R * n)
        workspace.give(GtS)
        if self.C_r is not None:
            Q_ry.add_(self.C_r)
        SF = workspace.empty((a, R * n), S)  # S F
        torch.mm(S.reshape(a * R, m), W, out=SF.view(a * R, n))
        S_new = workspace.empty((R * n, R * n), S)  # Fᵀ S F
        torch.bmm(W.mT.expand(R, n, m), SF.view(R, m, R * n), out=S_new.view(R, n, R * n))
        workspace.give(SF)
        S_new = plus(self.E, S_new)
        factor = SymmetricFactor.of(Q_rr)  # large pivots: Cholesky where it applies
        if factor is None:
            raise StageSingular(index)
        K = factor.solve(Q_ry)
        S_new.addmm_(Q_ry.mT, K, alpha=-1.0)  # the Schur complement
        if self.n_perp and self.coupled:
            if self._CtC is None and self.g_sq is None and self.C_span is None:
                # C_⊥ᵀC_⊥ = ΓᵀΓ ⊗ P̄ added from its factors, in place (never formed)
                GtG, Pbar = self._complement_factors()
                S_new.view(R, n, R, n).addcmul_(GtG.view(R, 1, R, 1), Pbar.view(1, n, 1, n), value=-1.0 / damping)
            else:
                S_new.add_(self.CtC, alpha=-1.0 / damping)
        return symmetrized(S_new), DirectAffineFactor(self, damping, factor, Q_ry, K)

    def _value_hessian_base(self, Wt: Tensor, SW: Tensor, damping: float, index: int) -> Tensor:
        """``E + WᵀSW − C_⊥ᵀC_⊥/ε`` as a fresh tensor (one ``addmm`` for a Linear layer)."""
        complement = self.n_perp and self.coupled
        self._check_complement(damping, index)
        if self.E_dense is None:
            return torch.addmm(self.CtC, Wt, SW, beta=-1.0 / damping) if complement else Wt @ SW
        base = torch.add(self.E_dense, self.CtC, alpha=-1.0 / damping) if complement else self.E_dense
        return torch.addmm(base, Wt, SW)


def with_complement(span: Inertia | None, n_perp: int, damping: float) -> Inertia:
    """The span's inertia, and the pivot ``ε`` on each of the ``n_⊥`` complement directions
    (negative for a shift ``ε < 0``)."""
    pos, neg = (span.positive, span.negative) if span is not None else (0, 0)
    return Inertia(pos + n_perp, neg, 0) if damping > 0 else Inertia(pos, neg + n_perp, 0)


def plus_complement_logdet(span: Tensor | None, n_perp: int, damping: float) -> Tensor:
    """``log|det Q_ζζ| + n_⊥·log ε``."""
    extra = n_perp * math.log(abs(damping)) if n_perp else 0.0
    return (span if span is not None else torch.zeros((), dtype=torch.float64)) + extra


class DirectAffineFactor(StageFactor):
    __slots__ = ("stage", "damping", "factor", "Q_ry", "K")

    def __init__(self, stage, damping, factor, Q_ry, K):
        self.stage, self.damping, self.factor, self.Q_ry, self.K = stage, damping, factor, Q_ry, K

    @property
    def unchecked(self) -> SymmetricFactor | None:
        """The span pivot's factor if the factorization still has to test its pivots
        (the one-sample path defers the test; the others test at once)."""
        return self.factor if self.stage.W is not None else None

    @property
    def inertia(self) -> Inertia:
        return with_complement(
            self.factor.inertia() if self.factor is not None else None, self.stage.n_perp, self.damping
        )

    @property
    def logdet(self) -> Tensor:
        span = self.factor.logdet() if self.factor is not None else None
        return plus_complement_logdet(span, self.stage.n_perp, self.damping)

    def pivot_factors(self) -> tuple:
        return (self.factor,) if isinstance(self.factor, SymmetricFactor) else ()

    def span_pivot(self):
        return self.factor if isinstance(self.factor, SymmetricFactor) else None

    def backward(self, t: Tensor | None, b: Tensor):
        """``u = Q_ζζ⁻¹(G_Vᵀt − b_ζ)`` and ``t ← Fᵀt − Q_ζyᵀu + C_⊥ᵀb_⊥/ε`` (``−u`` is kept)."""
        st = self.stage
        k = b.shape[1]
        T = st._tilde(b)  # q × (m·k)
        nu = None
        t_new = None if t is None or st.FT_apply is None else st.FT_apply(t)
        b_perp = T if st.n_perp else None
        if st.r:
            Zb = st.Vt @ T  # r × (m·k): the span part, ordered (i, k)
            nq = Zb.reshape(-1, k)  # −q = b_ζ − G_Vᵀt
            if t is not None:
                nq = torch.add(nq, t, alpha=-st.scalar) if st.scalar is not None else nq - st._gvt(t)
            nu = self.factor.solve(nq)
            t_new = thin_product(self.Q_ry.mT, nu) if t_new is None else thin_addmm(t_new, self.Q_ry.mT, nu)
            if st.n_perp:
                b_perp = torch.addmm(T, st.V, Zb, alpha=-1.0)
        if b_perp is not None and st.coupled:
            # −C_⊥ᵀ u_⊥ with u_⊥ = −b_⊥/ε
            if st.fused and k == 1:
                if t_new is None:
                    t_new = (b_perp[: st.Et.shape[1]] @ st.g).div_(self.damping)
                else:
                    t_new = torch.addmm(t_new, b_perp[: st.Et.shape[1]], st.g, alpha=1.0 / self.damping)
            elif t_new is None:
                t_new = st._c_t(b_perp, k).div_(self.damping)
            else:
                t_new = torch.add(t_new, st._c_t(b_perp, k), alpha=1.0 / self.damping)
        return (nu, b_perp, k), t_new

    def forward(self, y: Tensor | None, u):
        """``ζ = −K y − u``, ``θ_⊥ = (b_⊥ − C_⊥y)/ε``, ``y ← F y + G_V ζ``."""
        st = self.stage
        nu, b_perp, k = u
        T = None
        fuse_F = st.W is not None and y is not None and st.r  # y ← W y + σζ in one addmm
        y_new = None if y is None or st.F_apply is None or fuse_F else st.F_apply(y)
        if st.r:
            zeta = nu if y is None else thin_addmm(nu, self.K, y, alpha=-1.0)
            if fuse_F:
                y_new = torch.addmm(zeta, st.W, y, beta=st.scalar)
            elif st.scalar is not None:
                y_new = zeta * st.scalar if y_new is None else torch.add(y_new, zeta, alpha=st.scalar)
            else:
                gz = st._gv(zeta)
                y_new = gz if y_new is None else y_new + gz
            T = zeta.reshape(st.r, -1)  # V ζ is added below
        if b_perp is not None:
            inv = 1.0 / self.damping
            T = b_perp * inv if T is None else torch.addmm(b_perp, st.V, T, beta=inv)
            if y is not None and st.coupled:
                if st.fused and k == 1:  # C_⊥y = ((I − vvᵀ)Ẽ y) gᵀ
                    T = torch.addmm(T, st.PE @ y, st.g.mT, alpha=-inv)
                elif st.pad and k == 1 and st.C_span is None:
                    # C_⊥y = (I − VVᵀ)[Mᵀ; 0] with M = Γ Y (m × n), added in place
                    n = st.Et.shape[1]
                    M = st.Gam @ y.reshape(st.Gam.shape[1], n)
                    T[:n].sub_(M.mT, alpha=inv)
                    T.addmm_(st.V, st.VtE @ M.mT, alpha=inv)
                else:
                    T = torch.add(T, st._c_perp(y), alpha=-inv)
        elif T is not None:
            T = st.V @ T
        return st._untilde(T, k), y_new
