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

import math

import torch
from torch import Tensor

from . import _workspace, batched_sweeps
from .affine import AffineStage, ReducedAffineStage
from .batched_sweeps import COVERED, BatchedRun
from .stage_algebra import (
    SymmetricFactor,
    _congruence,
    _congruence_is_dense,
    _plus,
    _raise_if_null_directions,
    _StageSingular,
    _symmetrize,
    first_singular,
    subtract_symmetric_product,
)
from .blocks.protocol import Oracle
from .errors import SingularSystemError
from .linalg.kronecker import identity_kronecker_factor
from .linalg import (
    Diagonal,
    Inertia,
    LinearOperator,
    LowRank,
    ScaledIdentity,
    SingularMatrixError,
    SymmetricBlockTridiagonal,
    Zero,
    pivot_tolerance,
)


# ---------------------------------------------------------------------------------------
# Stages: the ε-independent data of one block, prepared once per curvature.


def _is_zero(op: LinearOperator) -> bool:
    if isinstance(op, Zero):
        return True
    if isinstance(op, LowRank):  # from its factors, without forming U M Uᵀ
        return not (bool(op.U.any()) and bool(op.M.any()))
    return not bool(op.to_dense().any())


def _mm(A, x: Tensor) -> Tensor:
    """``A x`` for a dense tensor or an operator (unchecked: shapes are known to fit)."""
    return A @ x if isinstance(A, Tensor) else A._matmat(x)


def _gvt_product(GVt, S: Tensor) -> tuple[Tensor, bool]:
    """``G_Vᵀ S``, and whether it is in a buffer of the workspace pool (the caller gives
    it back): so for ``G_Vᵀ = I_m ⊗ B`` (a convolution's span, channel-major), one
    batched product."""
    B = identity_kronecker_factor(GVt) if not isinstance(GVt, Tensor) else None
    if B is None or not S.is_contiguous():
        return _mm(GVt, S), False
    m, N = S.shape[0] // B.shape[1], S.shape[1]
    out = _workspace.empty((m * B.shape[0], N), S)
    torch.matmul(B, S.view(m, B.shape[1], N), out=out.view(m, B.shape[0], N))
    return out, True


def _zero_map(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


class ActivationStage:
    """A block without parameters: ``S ← E + FᵀSF``, ``t ← Fᵀt``, ``y ← F y``."""

    p = 0

    def __init__(self, oracle: Oracle, compiled=None):
        from .products import CompiledOracle

        self.F, self.E = oracle.F, oracle.E
        self.FT = oracle.F.T
        # the sweeps' products y ↦ F y, t ↦ Fᵀ t as plain tensor functions (made on first use)
        self._compiled = compiled if compiled is not None else CompiledOracle(oracle)
        self.diagonal = isinstance(self.F, (Diagonal, ScaledIdentity)) and isinstance(self.E, (Diagonal, Zero))
        # F = diag(d), a small: FᵀSF + E = S ⊙ ddᵀ + E is one addcmul with ddᵀ and E formed
        # once (for large a, forming E densely costs more than adding its diagonal)
        self._dd = self._E = None
        if isinstance(self.F, Diagonal) and isinstance(self.E, (Diagonal, Zero)) and self.F.shape[0] <= 128:
            d = self.F.diagonal
            self._dd = torch.outer(d, d)  # d_i·d_j = d_j·d_i: symmetric exactly
            self._E = torch.diag(self.E.diagonal) if isinstance(self.E, Diagonal) else None

    @property
    def F_apply(self):
        return self._compiled.F or _zero_map

    @property
    def FT_apply(self):
        return self._compiled.FT or _zero_map

    def eliminate(self, S: Tensor, damping: float, index: int):
        if self._dd is not None:
            return (S * self._dd if self._E is None else torch.addcmul(self._E, S, self._dd)), None
        S_new = _plus(self.E, _congruence(self.F, S))
        # D S D (+ a diagonal) of a symmetric S is symmetric bit for bit: s_ij·d_i·d_j
        return (S_new if self.diagonal else _symmetrize(S_new)), None


class DenseStage:
    """A block with parameters, its oracle as dense matrices, split by the row space of ``G``.

    With the thin SVD ``G = U Σ Vᵀ`` of rank ``r``, parameter space is ``range(V_r)`` ⊕
    ``null(G)``. On ``null(G)`` the term ``GᵀSG`` vanishes *exactly*, so there
    ``Q_θθ = A_⊥⊥ + εI``; its eigenbasis ``Z`` (``A_⊥⊥ = Z diag(α) Zᵀ``) is computed once,
    and ``(A_⊥⊥ + εI)⁻¹ = Z diag(1/(α+ε)) Zᵀ`` is exact for every ``ε``. Only the
    ``r × r`` part (``r ≤ a_out``) is factored per damping. This is what keeps the
    elimination accurate at small ``ε``: a dense factorization of ``εI + GᵀSG`` would
    see ``ε`` drowned by rounding errors of size ``eps·‖GᵀSG‖`` on ``null(G)`` and
    pass ``1/ε``-amplified errors on to the stages before it.

    Where ``A`` vanishes on part of ``null(G)`` that part needs no basis: its pivots are
    ``ε`` exactly, and it is kept implicit as a projector (the *rest*). When ``A = 0`` (a
    block linear in its parameters) the whole of ``null(G)`` is the rest, ``α`` is empty
    and nothing of size ``p × p`` is formed. When ``A = U M Uᵀ`` is a
    :class:`~tallskinny.linalg.LowRank` of rank ``k`` (a residual unit with parameters in
    several inner blocks), ``Z`` spans the part of ``range(U)`` in ``null(G)`` (at most
    ``k`` columns, from an SVD of ``p × k``) and the rest is everything else: ``O(p·k²)``
    instead of the ``O(p³)`` eigendecomposition of a dense ``A_⊥⊥``.
    ``orthogonal_columns=True`` declares that the columns of ``G`` are orthogonal and
    nonzero (so ``V = I`` without an SVD), as for the span of an affine block.

    Next to ReLUs (``ignored_rows``: outputs the next block discards; ``zero_inputs``:
    inputs the block before zeroes), a dense ``F`` is used on the live rows and columns
    only, where the value Hessian and everything read later live.
    """

    def __init__(
        self,
        oracle: Oracle,
        ignored_rows: Tensor | None = None,
        output_range: Tensor | None = None,
        *,
        orthogonal_columns: bool = False,
        zero_inputs: Tensor | None = None,
    ):
        keep_structure = orthogonal_columns and ignored_rows is None and output_range is None
        # G = I_m ⊗ B with rows dropped (a convolution's span at one sample, dead ReLU
        # units): the SVD splits into m small ones, one per diagonal block
        B = identity_kronecker_factor(oracle.G) if ignored_rows is not None and output_range is None else None
        G = oracle.G if keep_structure or B is not None else oracle.G.to_dense()
        # Outputs that the rest of the chain ignores exactly do not count in the row space:
        # ``ignored_rows`` (a ReLU's dead units) are dropped, and G is projected on
        # ``output_range`` (an orthonormal basis of the range of the value Hessian S, when S
        # is known before any ε enters). Both are exact, and keep the directions they
        # remove in null(G), where ε is handled exactly.
        if ignored_rows is not None and B is None:
            G = G.masked_fill(ignored_rows.unsqueeze(-1), 0.0)
        if output_range is not None:
            G = output_range @ (output_range.mT @ G)
        a, p = G.shape
        self.p = p
        self.g_norm = 0.0  # ‖G‖₂ where A ≠ 0 can cancel GᵀSG (the scale of the pivot test)
        self.F, self.E = oracle.F, oracle.E
        self.FT = oracle.F.T
        C = oracle.C.to_dense()
        kw = dict(dtype=C.dtype, device=C.device)
        a_in = C.shape[1]
        # products of a damping on the live rows and columns only (see _live_products);
        # then everything of C is computed on the live inputs and embedded with zeros
        live = ignored_rows is not None and _congruence_is_dense(self.F) and isinstance(self.E, Zero)
        li = (~zero_inputs).nonzero().squeeze(1) if live and zero_inputs is not None else None
        C = C if li is None else C.index_select(1, li)
        if keep_structure:
            # the row space of G is everything: V = I, kept implicit (V is None); G keeps
            # whatever operator structure it has (products with it are all we need)
            r = p
            self.V = None
            self.GV = G
            self.C_r = C
        elif B is not None:
            V_blocks, self.GV = _masked_kronecker_svd(B, ignored_rows)
            self.g_norm = float(torch.linalg.matrix_norm(self.GV, 2)) if self.GV.numel() else 0.0
            self.V = torch.block_diag(*V_blocks)
            r = self.V.shape[1]
            # V is block diagonal: C_r = VᵀC and V C_r one channel at a time
            C_parts = C.split([blk.shape[0] for blk in V_blocks])
            C_r_parts = [blk.mT @ Ci for blk, Ci in zip(V_blocks, C_parts)]
            self.C_r = torch.cat(C_r_parts)  # r × a_in
            VC_r = torch.cat([blk @ Cr for blk, Cr in zip(V_blocks, C_r_parts)])
        else:
            U, sigma, Vh = torch.linalg.svd(G, full_matrices=False)
            self.g_norm = float(sigma[0]) if sigma.numel() else 0.0
            tol = pivot_tolerance(max(a, p), G.dtype, self.g_norm)
            r = int((sigma > tol).sum())
            self.V = Vh[:r].mT  # p × r, orthonormal basis of the row space of G
            self.GV = U[:, :r] * sigma[:r]  # G V_r, a × r
            self.C_r = self.V.mT @ C  # r × a_in
        self.r = r
        self.GVt = self.GV.T
        # null(G) = range(Z) ⊕ rest; A on range(V) ⊕ range(Z): A_rr, A_rz, diag(α)
        self.Z = self.alpha = self.C_z = self.A_rr = self.A_rz = None
        self.a_norm = 0.0  # a bound of ‖A‖₂: the scale of the rounding errors of α
        A = oracle.A
        a_zero = _is_zero(A)
        V = self.V if self.V is not None or a_zero else torch.eye(p, **kw)
        if isinstance(A, LowRank):
            self._low_rank_complement(A, V)
        elif not a_zero and p > r:
            A = _symmetrize(A.to_dense())
            self.a_norm = float(torch.linalg.vector_norm(A))  # ‖A‖_F ≥ ‖A‖₂
            V_perp = torch.linalg.qr(V, mode="complete")[0][:, r:] if r else torch.eye(p, **kw)
            self.alpha, W = torch.linalg.eigh(V_perp.mT @ A @ V_perp)
            self.Z = V_perp @ W  # p × (p − r)
            AV = A @ V
            self.A_rr = V.mT @ AV
            self.A_rz = AV.mT @ self.Z
        elif not a_zero:  # null(G) = {0}
            A = _symmetrize(A.to_dense())
            self.a_norm = float(torch.linalg.vector_norm(A))
            self.A_rr = V.mT @ A @ V
        self.k = 0 if self.Z is None else self.Z.shape[1]
        if self.Z is not None:
            self.C_z = self.Z.mT @ C  # k × a_in
        self.n_rest = p - r - self.k
        self.C_rest = self.CtC = None
        if self.n_rest:
            # C on the rest, in ambient coordinates: (I − VVᵀ − ZZᵀ) C
            C_rest = C - (VC_r if B is not None else V @ self.C_r) if r else C
            if self.Z is not None:
                C_rest = C_rest - self.Z @ self.C_z
            self.C_rest = C_rest
            self.CtC = _symmetrize(C_rest.mT @ C_rest)
        self._live = None
        if live:
            li = torch.arange(a_in, device=C.device) if li is None else li
            self._live = self._live_products(ignored_rows, li)
            if li.shape[0] < a_in:  # the sweeps read C on all inputs: zeros on the dead ones
                self.C_r, self.C_z, self.C_rest = (_embed_columns(M, li, a_in) for M in (self.C_r, self.C_z, self.C_rest))
                if self.CtC is not None:
                    self.CtC = _embed_square(self.CtC, li, a_in)

    def _live_products(self, ignored_rows: Tensor, li: Tensor):
        """Where the outputs ``ignored_rows`` are dropped, the value Hessian ``S`` arriving
        here is exactly zero on them, and where an input is identically zero (a ReLU's dead
        unit before this block; ``li`` are the others) nothing computed for it is ever
        read: the dense products of a damping then run on the live rows and columns only
        (``O(n_out²·n_in)`` instead of ``O(a_out²·a_in)``). Returns the live indices and
        ``F``, ``G_V``, ``C_r``, ``C_⊥ᵀC_⊥``, ``C_z`` on them (the ``C`` parts are already
        computed on the live inputs)."""
        lo = (~ignored_rows).nonzero().squeeze(1)
        F_oi = self.F.to_dense().index_select(0, lo).index_select(1, li)
        GV_o = self.GV.index_select(0, lo)
        return lo, li, F_oi, GV_o, self.C_r, self.CtC, self.C_z

    def _low_rank_complement(self, A: "LowRank", V: Tensor) -> None:
        """``Z``, ``α``, ``A_rr``, ``A_rz`` for ``A = U M Uᵀ``: on ``null(G)`` the matrix
        ``A_⊥⊥`` lives on ``range((I − VVᵀ)U)``. With the Householder QR ``V = Q[:, :r]``
        (``Q`` kept as its reflectors) the coordinates of that range in the basis
        ``Q[:, r:]`` of ``null(G)`` are ``U_n = (QᵀU)[r:]``; the SVD ``U_n = Ũ Σ W̃ᵀ`` turns
        ``A_⊥⊥`` there into the ``k' × k'`` matrix ``Σ W̃ᵀ M W̃ Σ``, whose eigenvectors give
        ``Z = Q[:, r:] Ũ W``.

        Every column of ``Z`` lies in ``null(G)`` by construction (``k' ≤ p − r``), also a
        direction that passes the rank test on rounding noise: a left singular vector of
        ``(I − VVᵀ)U`` for a singular value below ``eps·‖U‖`` (where ``U`` is rank-deficient
        or lies partly in ``range(V)``) is an arbitrary unit vector, not one of ``null(G)``,
        and taking it as a column of ``Z`` gave wrong answers (issue 14)."""
        U, M = A.U, _symmetrize(A.M)
        p, r = U.shape[0], V.shape[1]
        VtU = V.mT @ U  # r × k
        vtu_norm = float(torch.linalg.matrix_norm(VtU, 2)) if VtU.numel() else 0.0
        if r:
            self.A_rr = _symmetrize(VtU @ M @ VtU.mT)
        if r == p:  # null(G) = {0}
            self.a_norm = vtu_norm * vtu_norm * float(torch.linalg.vector_norm(M))
            return
        reflectors = None
        if r:
            reflectors = torch.geqrf(V)
            U_n = torch.ormqr(*reflectors, U, left=True, transpose=True)[r:]  # (p − r) × k
        else:
            U_n = U
        Ut, sig, Wh = torch.linalg.svd(U_n, full_matrices=False)
        # ‖U‖₂ ≤ hypot(‖VᵀU‖₂, ‖U_n‖₂) ≤ √2‖U‖₂ (QᵀU = [VᵀU; U_n]): no SVD of U itself
        u_norm = math.hypot(vtu_norm, float(sig[0]) if sig.numel() else 0.0)
        self.a_norm = u_norm * u_norm * float(torch.linalg.vector_norm(M))  # ≥ ‖U M Uᵀ‖₂
        k = int((sig > pivot_tolerance(max(U.shape), U.dtype, u_norm)).sum())
        if not k:
            return
        SW = Wh[:k].mT * sig[:k]  # k_U × k': U_n = Ũ (SW)ᵀ on the kept part
        self.alpha, W = torch.linalg.eigh(_symmetrize(SW.mT @ M @ SW))
        Z_n = Ut[:, :k] @ W
        if reflectors is None:
            self.Z = Z_n
        else:  # Q [0; Z_n]: orthonormal, orthogonal to range(V) to working precision
            self.Z = torch.ormqr(*reflectors, torch.cat((Z_n.new_zeros(r, k), Z_n)), left=True, transpose=False)
        if r:
            self.A_rz = VtU @ M @ (SW @ W)  # UᵀZ = W̃Σ W on the kept part: r × k'

    # -- elimination -------------------------------------------------------------------------
    def eliminate(self, S: Tensor, damping: float, index: int):
        if self._live is not None:
            return self._eliminate_live(S, damping, index)
        GtS, pooled = _gvt_product(self.GVt, S)  # G_VᵀS
        SGV = GtS.mT  # S G_V = (G_VᵀS)ᵀ: S is symmetric
        if _congruence_is_dense(self.F):
            # F used densely anyway (a convolution, a fallback block): SF once gives both
            # FᵀSF and Q_ζy = C + G_VᵀSF, instead of a second product with Fᵀ (SF and the
            # new S in buffers of the workspace pool)
            Fd = self.F.to_dense()
            SF = torch.mm(S, Fd, out=_workspace.empty((S.shape[0], Fd.shape[1]), S))
            S_new = _plus(self.E, torch.mm(Fd.mT, SF, out=_workspace.empty((Fd.shape[1],) * 2, S)))
            GtSF = _mm(self.GVt, SF)
            # Q_ζy = C + G_VᵀSF, in place where the product is a new tensor
            shared = GtSF.untyped_storage().data_ptr() == SF.untyped_storage().data_ptr()
            Q_ry = GtSF + self.C_r if shared else GtSF.add_(self.C_r)  # r × a_in
            _workspace.give(SF)
        else:
            Q_ry = self.C_r + self.FT._matmat(SGV).mT  # r × a_in
            S_new = _plus(self.E, _congruence(self.F, S))  # Q_yy, then its Schur complement
        Q_rr = self.GVt @ SGV
        if pooled:
            _workspace.give(GtS)
        S_norm = torch.linalg.vector_norm(S) if self.A_rr is not None else None
        S_new, factor, K_r, d, inertia, logdet = self._schur(S_new, Q_rr, Q_ry, self.C_z, self.CtC, damping, index, S_norm)
        return S_new, _DenseStageFactor(self, damping, d, factor, Q_ry, K_r, inertia, logdet)

    def _eliminate_live(self, S: Tensor, damping: float, index: int):
        """:meth:`eliminate` on the live rows and columns (see ``_live_products``);
        ``Q_ζy``, ``K`` and the new ``S`` are zero on the dead inputs, which no later step reads."""
        lo, li, F_oi, GV_o, C_ri, CtC_ii, C_zi = self._live
        S_oo = S.index_select(0, lo).index_select(1, lo)
        SF = S_oo @ F_oi
        Q_ry = torch.addmm(C_ri, GV_o.mT, SF)  # r × n_in
        Q_rr = GV_o.mT @ (S_oo @ GV_o)
        S_norm = torch.linalg.vector_norm(S_oo) if self.A_rr is not None else None
        S_ii, factor, K_r, d, inertia, logdet = self._schur(F_oi.mT @ SF, Q_rr, Q_ry, C_zi, CtC_ii, damping, index, S_norm)
        a_in = self.F.shape[1]
        S_new = _embed_square(S_ii, li, a_in)
        Q_ry, K_r = _embed_columns(Q_ry, li, a_in), _embed_columns(K_r, li, a_in)
        return S_new, _DenseStageFactor(self, damping, d, factor, Q_ry, K_r, inertia, logdet)

    def _schur(self, S_new, Q_rr, Q_ry, C_z, CtC, damping: float, index: int, S_norm: Tensor | None = None):
        """``S_new − Q_yθ Q_θθ⁻¹ Q_θy`` over the rest (pivots ``ε``), ``Z`` (pivots ``α + ε``)
        and the span (``Q_rr + A_rr + εI``, factored), symmetrised, with the factors and the
        pivots' inertia and ``log|det|``. ``C_z``, ``CtC`` on the columns of ``Q_ry``.

        Where ``A ≠ 0`` it may cancel ``G_VᵀSG_V`` (``S_norm = ‖S‖_F`` is then given): the
        rounding errors of ``Q``, and so the pivots of a ``Q`` singular in exact arithmetic,
        scale with the terms ``‖G‖²‖S‖ + ‖A‖ + max|A_rz d⁻¹A_rzᵀ| + ε``, not with ``max|Q|``;
        ``Q`` is then also tested by its smallest eigenvalue against that bound
        (:meth:`SymmetricFactor.of`). Issue 14: the pivot test alone took an exactly
        singular stage of 35 in 180 random ones as regular (a silently wrong log|det|)."""
        terms = None
        if self.A_rr is not None:
            terms = [S_norm * (self.g_norm * self.g_norm), self.a_norm + damping]
            Q_rr = Q_rr + self.A_rr
        Q_rr.diagonal().add_(damping)
        pos = neg = 0
        logdet = None
        d = None
        Qt_rr, Qt_ry = Q_rr, Q_ry
        if self.n_rest:
            # on the rest the pivots are ε exactly: singular only for ε = 0
            if damping == 0.0:
                _raise_if_null_directions(self.CtC, index)
                raise _StageSingular(index)
            S_new -= CtC / damping  # (S_new is always a fresh tensor here: updated in place)
            # (a negative ε — a shift — makes these pivots negative)
            pos, neg = (self.n_rest, 0) if damping > 0 else (0, self.n_rest)
            logdet = self.n_rest * math.log(abs(damping))
        if self.k:
            # α carries rounding errors of ‖A‖ times two sums of length p (ZᵀAZ, Z orthogonal
            # to range(V) to working precision, not exactly), ε none: Weyl bounds |α + ε| by
            # them where α + ε = 0 in exact arithmetic
            d = self.alpha + damping
            tol = pivot_tolerance(2 * self.p, S_new.dtype, max(self.a_norm, float(self.alpha.abs().max())))
            if bool((d.abs() <= tol).any()) or bool((d == 0).any()):
                raise _StageSingular(index)
            S_new -= C_z.mT @ (C_z / d.unsqueeze(-1))
            pos, neg = pos + int((d > 0).sum()), neg + int((d < 0).sum())
            z_logdet = d.abs().log().sum()
            logdet = z_logdet if logdet is None else z_logdet + logdet
            if self.A_rz is not None:
                Ad = self.A_rz / d
                AdA = Ad @ self.A_rz.mT
                terms.append(torch.linalg.vector_norm(AdA, float("inf")))
                Qt_rr = Q_rr - AdA
                Qt_ry = Q_ry - Ad @ C_z
        factor = K_r = None
        if self.r:
            # ‖ΔQ‖ ≤ γ_k·(terms) with k = 4(p + a): two products over a, two over p, and the SVD
            factor = SymmetricFactor.of(Qt_rr, terms, 4 * (self.p + self.GV.shape[0]))
            if factor is None:
                raise _StageSingular(index)
            K_r = factor.solve(Qt_ry)
            S_new = subtract_symmetric_product(S_new, Qt_ry, K_r)  # symmetric
        else:
            S_new = _symmetrize(S_new)
        return S_new, factor, K_r, d, (pos, neg), logdet


def _embed_columns(M: Tensor | None, columns: Tensor, n: int) -> Tensor | None:
    """``M`` as the given columns of a zero matrix with ``n`` columns."""
    return None if M is None else M.new_zeros(M.shape[0], n).index_copy_(1, columns, M)


def _embed_square(M: Tensor, index: Tensor, n: int) -> Tensor:
    """``M`` as the block ``(index, index)`` of an ``n × n`` zero matrix."""
    out = M.new_zeros(n, n)
    out[index.unsqueeze(1), index] = M
    return out


def _masked_kronecker_svd(B: Tensor, ignored_rows: Tensor) -> tuple[list[Tensor], Tensor]:
    """``(V's diagonal blocks, G V)`` for ``G = I_m ⊗ B`` (``B``: ``R × q``) with the rows ``ignored_rows``
    set to zero: ``G`` is block diagonal, so its thin SVD is that of its ``m`` blocks, each
    on its live rows only (``m`` SVDs of ``n_live × q`` instead of one of ``m·R × m·q``),
    with the rank tolerance of the whole matrix, ``max(a, p)·eps·σ_max``."""
    R, q = B.shape
    m = ignored_rows.numel() // R
    live = [torch.nonzero(~dead).squeeze(1) for dead in ignored_rows.reshape(m, R)]
    svds = [torch.linalg.svd(B.index_select(0, rows), full_matrices=False) for rows in live]
    sigma_max = max((float(s.max()) for _, s, _ in svds if s.numel()), default=0.0)
    tol = pivot_tolerance(m * max(R, q), B.dtype, sigma_max)
    V_blocks, GV_blocks = [], []
    for rows, (U, sigma, Vh) in zip(live, svds):
        k = int((sigma > tol).sum())  # singular values come sorted
        V_blocks.append(Vh[:k].mT)
        block = B.new_zeros(R, k)  # G V on this channel: U σ on its live rows, zero on the dead
        block[rows] = U[:, :k] * sigma[:k]
        GV_blocks.append(block)
    return V_blocks, torch.block_diag(*GV_blocks)


class _DenseStageFactor:
    """The per-damping factors of a :class:`DenseStage`, used by the solve sweeps."""

    __slots__ = ("stage", "damping", "d", "factor", "Q_ry", "K_r", "_z_inertia", "_z_logdet")

    def __init__(self, stage, damping, d, factor, Q_ry, K_r, z_inertia, z_logdet):
        self.stage, self.damping, self.d, self.factor, self.Q_ry, self.K_r = stage, damping, d, factor, Q_ry, K_r
        self._z_inertia, self._z_logdet = z_inertia, z_logdet

    @property
    def inertia(self) -> Inertia:
        pos, neg = self._z_inertia
        if self.factor is not None:
            inertia = self.factor.inertia()
            pos, neg = pos + inertia.positive, neg + inertia.negative
        return Inertia(pos, neg, 0)

    @property
    def logdet(self) -> Tensor:
        out = self.factor.logdet() if self.factor is not None else torch.zeros((), dtype=torch.float64)
        return out if self._z_logdet is None else out + self._z_logdet

    def backward(self, t: Tensor | None, b: Tensor):
        """``u = Q_θθ⁻¹(Gᵀt − b)`` in (span, Z, rest) parts, and the new ``t``."""
        st = self.stage
        u_r = u_z = u_rest = None
        q_z = -(st.Z.mT @ b) if st.k else None
        if st.r:
            q_r = -(b if st.V is None else st.V.mT @ b)
            if t is not None:
                q_r = q_r + _mm(st.GVt, t)
            if st.A_rz is not None:
                q_r = q_r - (st.A_rz / self.d) @ q_z
            u_r = self.factor.solve(q_r)
        if st.k:
            u_z = q_z if st.A_rz is None else q_z - st.A_rz.mT @ u_r
            u_z = u_z / self.d.unsqueeze(-1)
        if st.n_rest:  # −b on the rest, over ε
            rest = b if st.V is None else b - st.V @ (st.V.mT @ b)
            if st.k:
                rest = rest - st.Z @ (st.Z.mT @ b)
            u_rest = rest / -self.damping
        t_new = None if t is None else st.FT._matmat(t)
        if u_r is not None:
            t_new = _sub(t_new, self.Q_ry.mT @ u_r)
        if u_z is not None:
            t_new = _sub(t_new, st.C_z.mT @ u_z)
        if u_rest is not None:
            t_new = _sub(t_new, st.C_rest.mT @ u_rest)
        return (u_r, u_z, u_rest), t_new

    def forward(self, y: Tensor | None, u):
        """``θ = −Q_θθ⁻¹(Q_θy y + q)`` in ambient coordinates, and the new ``y``."""
        st = self.stage
        u_r, u_z, u_rest = u
        theta = theta_r = None
        Ky = None if y is None or not st.r else self.K_r @ y
        if st.r:
            theta_r = -u_r if y is None else -Ky - u_r
            theta = theta_r if st.V is None else st.V @ theta_r
        if st.k:
            theta_z = -u_z
            if y is not None:
                w = st.C_z @ y
                if st.A_rz is not None:
                    w = w - st.A_rz.mT @ Ky
                theta_z = theta_z - w / self.d.unsqueeze(-1)
            theta_z = st.Z @ theta_z
            theta = theta_z if theta is None else theta + theta_z
        if st.n_rest:
            theta_rest = -u_rest if y is None else -u_rest - (st.C_rest @ y) / self.damping
            theta = theta_rest if theta is None else theta + theta_rest
        y_new = None if y is None else st.F._matmat(y)
        if theta_r is not None:
            gy = _mm(st.GV, theta_r)
            y_new = gy if y_new is None else y_new + gy
        return theta, y_new


def _sub(a: Tensor | None, b: Tensor) -> Tensor:
    return -b if a is None else a - b


def prepare_stages(oracles: Sequence[Oracle], loss: Oracle, compiled: Sequence | None = None) -> list:
    """The ε-independent stage data of every block (computed once per curvature).

    Runs of one-sample ``nn.Linear`` + activation pairs (:mod:`tallskinny.batched_sweeps`)
    get one :class:`~tallskinny.batched_sweeps.LinearRunStage` at their first block (the
    others hold :data:`~tallskinny.batched_sweeps.COVERED`). Blocks affine in their
    parameters (their oracle says so with Kronecker-structured operators) get an
    :class:`~tallskinny.affine.AffineStage`; other blocks with
    parameters a :class:`DenseStage`; blocks without an :class:`ActivationStage`.
    ``compiled`` are the oracles' :class:`~tallskinny.products.CompiledOracle` where at
    hand (the stages then share their products and their reading of the structure).
    """
    from .products import CompiledBlocks, CompiledOracle

    if compiled is None:
        compiled = CompiledBlocks(CompiledOracle(o) for o in oracles)
    elif not isinstance(compiled, CompiledBlocks):
        compiled = CompiledBlocks(compiled)
    last = max((i for i, c in enumerate(compiled) if c.p), default=-1)
    stages: list = [None] * len(oracles)
    for start, stage in _run_stages(compiled, last):
        stages[start] = stage
        stages[start + 1 : stage.end] = [COVERED] * (stage.end - start - 1)
    for i, (o, c) in enumerate(zip(oracles, compiled)):
        if stages[i] is not None:
            continue
        if o.G.shape[1] == 0:
            stages[i] = ActivationStage(o, c)
            continue
        parts = c.parts
        output_range = _value_hessian_range(oracles[i + 1:], loss) if i == last else None
        if parts is not None and output_range is None and c.sample_major:
            # outputs the next block ignores (dead ReLU units) need no special care here:
            # their rows of S are exactly zero, so Q_ζζ has the exact pivot ε there
            stages[i] = AffineStage(o, parts, c)
            continue
        if i == last:
            kw = dict(output_range=output_range)
        else:
            kw = dict(
                ignored_rows=_ignored_rows(oracles[i + 1] if i + 1 < len(oracles) else None),
                zero_inputs=_zero_inputs(oracles[i - 1]) if i else None,
            )
        if parts is None:
            stages[i] = DenseStage(o, **kw)
        else:
            stages[i] = ReducedAffineStage(o, parts, lambda reduced: _reduced_stage(reduced, kw))
    return stages


def _run_stages(compiled, last: int):
    """``(start, LinearRunStage)`` of the batched HVP runs of ``compiled`` (a
    :class:`~tallskinny.products.CompiledBlocks`), each cut before the last block with
    parameters (whose stage also drops the loss's null space) and kept if it still has
    ``batched_sweeps.MIN_RUN`` pairs."""
    out = []
    for start, (end, run) in compiled.run_plan()[0].items():
        J = (min(end, last) - start) // 2
        if J >= batched_sweeps.MIN_RUN:
            out.append((start, batched_sweeps.LinearRunStage(run, start, J)))
    return out


def _reduced_stage(reduced: Oracle, kw: dict):
    if not reduced.G.shape[1]:
        return _NoParameters(reduced)
    return DenseStage(reduced, **kw, orthogonal_columns=True)


class _NoParameters(ActivationStage):
    """A reduced stage with no parameters left (all inputs zero): ``S ← E + FᵀSF``."""

    def eliminate(self, S: Tensor, damping: float, index: int):
        return super().eliminate(S, damping, index)[0], None


def _value_hessian_range(activations: Sequence[Oracle], loss: Oracle) -> Tensor | None:
    """An orthonormal basis of the range of the value Hessian after the last block with
    parameters. It does not depend on ε (only parameter-free blocks and the loss follow),
    so its rank is decided once: eigenvalues below ``n·eps·max|λ|`` are zeros (the
    softmax invariance of cross-entropy gives one per sample). ``None``: full rank."""
    S = _symmetrize(loss.E.to_dense())
    for o in reversed(activations):
        S = _symmetrize(_plus(o.E, _congruence(o.F, S)))
    lam, Q = torch.linalg.eigh(S)
    n = lam.shape[0]
    keep = lam.abs() > pivot_tolerance(n, S.dtype, float(lam.abs().max()) if n else 0.0)
    if bool(keep.all()):
        return None
    return Q[:, keep]


def _ignored_rows(nxt: Oracle | None) -> Tensor | None:
    """Outputs whose value the next (parameter-free, diagonal) block discards exactly:
    ``F_kk = 0`` and ``E_kk = 0``, so neither ``y_k`` nor its curvature reaches the loss."""
    if nxt is None or nxt.G.shape[1] or not isinstance(nxt.F, Diagonal):
        return None
    dead = nxt.F.diagonal == 0
    if isinstance(nxt.E, Diagonal):
        dead = dead & (nxt.E.diagonal == 0)
    elif not isinstance(nxt.E, Zero):
        return None
    return dead if bool(dead.any()) else None


def _zero_inputs(prev: Oracle) -> Tensor | None:
    """Inputs that are identically zero: outputs of a parameter-free diagonal block with
    ``F_kk = 0`` (a ReLU's dead units). Nothing computed for them is read: the block
    before multiplies the value Hessian and the adjoint there by ``F_kk = 0``."""
    if prev.G.shape[1] or not isinstance(prev.F, Diagonal):
        return None
    dead = prev.F.diagonal == 0
    return dead if bool(dead.any()) else None


def _last_block_norm(factors, damping: float) -> float:
    """A lower bound of ``‖H‖₂`` known for free: the last block with parameters sees the
    loss's own value Hessian (nothing is eliminated after it), so its span pivot
    ``Q − εI = VᵀH_LL V`` (orthonormal ``V``, linear block) is a compression of a diagonal
    block of ``H``, and ``‖H‖ ≥ ‖Q − εI‖₂`` (its eigenvalues up to 128 × 128, the
    largest column norm beyond). ``0`` where that does not hold."""
    last = next((f for f in reversed(factors) if f is not None), None)
    inner = getattr(last, "inner", last)  # a reduced affine stage wraps its span stage
    factor = getattr(inner, "factor", None)
    stage = getattr(inner, "stage", None)
    if not isinstance(factor, SymmetricFactor) or getattr(stage, "A_rr", None) is not None:
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

    def __init__(self, stages: Sequence, loss: Oracle, damping: float):
        self.damping = damping
        self._stages = list(stages)
        self._factors: list = [None] * len(stages)
        S = _symmetrize(loss.E.to_dense())
        unchecked: list = []  # (stage, factor) whose pivots are tested after the sweep
        try:
            for i in reversed(range(len(stages))):
                S_new, f = stages[i].eliminate(S, damping, i)
                # S is consumed: its buffer goes to the workspace pool, unless the factor
                # keeps it (a run, for its inertia) or the new S shares its memory
                if not isinstance(f, BatchedRun) and S_new.untyped_storage().data_ptr() != S.untyped_storage().data_ptr():
                    _workspace.give(S)
                S = S_new
                self._factors[i] = f
                if getattr(f, "unchecked", None) is not None:
                    unchecked.append((i, f.unchecked))
        except (_StageSingular, RuntimeError):
            # a singular stage passed unnoticed makes later ones fail on its infs/NaNs:
            # the first singular stage is the one to report
            bad = first_singular(unchecked)
            if bad is not None:
                raise _StageSingular(bad) from None
            raise
        bad = first_singular(unchecked)
        if bad is not None:
            raise _StageSingular(bad)
        self._inertia = self._logdet = self._plan = None
        self.norm_lower_bound = _last_block_norm(self._factors, damping)

    def _sweep_plan(self) -> tuple[list, list]:
        """The sweeps' steps in forward order, ``(start, end, factor)`` for a single stage
        (``end = start + 1``) or a run of stages (:mod:`tallskinny.batched_sweeps`), and
        the number of parameters of each step."""
        if self._plan is None:
            stages, factors = self._stages, self._factors
            plan, i = [], 0
            while i < len(stages):
                end = getattr(stages[i], "end", i + 1)
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
            if isinstance(f, BatchedRun):
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
            pos = neg = 0
            for f in self._factors:
                if f is not None:
                    inertia = f.inertia
                    pos, neg = pos + inertia.positive, neg + inertia.negative
            self._inertia = Inertia(pos, neg, 0)
        return self._inertia


# ---------------------------------------------------------------------------------------
class KKTFactorization:
    """``H + εI`` through the symmetric block-tridiagonal KKT system of the control problem.

    Stage ``l`` holds the variables ``(θ_l, y_l, λ_l)``; its diagonal block is
    ``[[A_l + εI, 0, G_lᵀ], [0, E_{l+1}, −I], [G_l, −I, 0]]`` (``E_{L+1} = E_loss``) and
    its coupling to stage ``l+1`` is ``C_{l+1}`` (row ``θ_{l+1}``) and ``F_{l+1}``
    (row ``λ_{l+1}``) in column ``y_l``. With ``m = Σ_l a_l`` multipliers,
    ``inertia(KKT) = inertia(H + εI) + (m, m, 0)`` and ``|det KKT| = |det(H + εI)|``.

    The oracles of a float32 chain are factored in float64 (they are exact there): the
    pivoted fallback's singularity verdict then means that the float32 problem is
    singular, not that a pivot fell below float32's rounding level.
    """

    def __init__(self, oracles: Sequence[Oracle], loss: Oracle, damping: float):
        self.damping = damping
        n = len(oracles)
        self._p = [o.G.shape[1] for o in oracles]
        self._a = [o.F.shape[0] for o in oracles]
        self._dtype = loss.E.dtype
        work = torch.float64 if self._dtype == torch.float32 else self._dtype
        ref = loss.E.to_dense().to(work)
        diagonal, lower = [], []
        for i, o in enumerate(oracles):
            p, a = self._p[i], self._a[i]
            E_next = (oracles[i + 1].E if i + 1 < n else loss.E).to_dense().to(work)
            D = ref.new_zeros((p + 2 * a, p + 2 * a))
            D[:p, :p] = o.A.to_dense().to(work) + damping * torch.eye(p, dtype=ref.dtype, device=ref.device)
            G = o.G.to_dense().to(work)
            D[:p, p + a:] = G.mT
            D[p + a:, :p] = G
            D[p:p + a, p:p + a] = E_next
            eye = torch.eye(a, dtype=ref.dtype, device=ref.device)
            D[p:p + a, p + a:] = -eye
            D[p + a:, p:p + a] = -eye
            # (symmetric to the oracles' rounding, which float64 sees in a float32 chain's)
            diagonal.append(_symmetrize(D) if work != self._dtype else D)
            if i + 1 < n:
                nxt = oracles[i + 1]
                pn, an = self._p[i + 1], self._a[i + 1]
                Lb = ref.new_zeros((pn + 2 * an, p + 2 * a))
                Lb[:pn, p:p + a] = nxt.C.to_dense().to(work)
                Lb[pn + an:, p:p + a] = nxt.F.to_dense().to(work)
                lower.append(Lb)
        self._m = sum(self._a)
        try:
            self._factor = SymmetricBlockTridiagonal(diagonal, lower).factorize()
        except SingularMatrixError as err:
            stage = getattr(err, "block", None)
            raise SingularSystemError(
                f"H + εI is singular at damping={damping:g}"
                + (f" (the elimination broke down at block {stage} of the chain)" if stage is not None else ""),
                damping=damping,
                stage=stage,
            ) from None
        k = self._factor.inertia()
        self._inertia = Inertia(k.positive - self._m, k.negative - self._m, k.zero)
        self.norm_lower_bound = 0.0

    def solve(self, b: Tensor) -> Tensor:
        rhs = []
        work = b.to(self._factor.dtype)
        for bl, p, a in zip(torch.split(work, self._p, dim=0), self._p, self._a):
            rhs.append(bl)
            rhs.append(work.new_zeros((2 * a, b.shape[1])))
        x = self._factor.solve(torch.cat(rhs, dim=0))
        out, pos = [], 0
        for p, a in zip(self._p, self._a):
            out.append(x[pos:pos + p])
            pos += p + 2 * a
        return torch.cat(out, dim=0).to(b.dtype)

    def logdet(self) -> Tensor:
        return self._factor.logdet().to(self._dtype)

    def sign(self) -> Tensor:
        return self.logdet().new_tensor(-1.0 if self._inertia.negative % 2 else 1.0)

    def inertia(self) -> Inertia:
        return self._inertia


def kkt_bytes(oracles: Sequence[Oracle]) -> int:
    """The bytes of the dense blocks :class:`KKTFactorization` forms: a diagonal block of
    size ``p_l + 2a_l``, its factors and a coupling block per block of the chain."""
    n = [o.G.shape[1] + 2 * o.F.shape[0] for o in oracles]
    itemsize = oracles[0].F.dtype.itemsize if oracles else 8
    return itemsize * sum(3 * k * k + k * m for k, m in zip(n, n[1:] + [0]))


# ---------------------------------------------------------------------------------------
def factorize(oracles: Sequence[Oracle], loss: Oracle, damping: float, stages: Sequence | None = None):
    """Factor ``H + εI``: the Riccati recursion, or the pivoted KKT factorization when a
    stage is singular. Raises :class:`SingularSystemError` when ``H + εI`` is singular.
    ``stages`` are the prepared stages (:func:`prepare_stages`) if already at hand."""
    try:
        return RiccatiFactorization(stages if stages is not None else prepare_stages(oracles, loss), loss, damping)
    except _StageSingular:
        return KKTFactorization(oracles, loss, damping)
