"""The generic stage: a block with parameters and dense (or unstructured) oracles."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...blocks.protocol import Oracle
from ...linalg import Inertia, LinearOperator, LowRank, Zero, pivot_tolerance
from ...linalg.kronecker import identity_kronecker_factor
from ...linalg.norms import max_abs
from ...linalg.thin import thin_product
from .. import workspace
from ..algebra import (
    StageSingular,
    SymmetricFactor,
    congruence,
    congruence_is_dense,
    plus,
    products_through_factors,
    raise_if_null_directions,
    subtract_schur,
    symmetrize,
)
from ..supported import Supported
from . import Stage, StageFactor


def _is_zero(op: LinearOperator) -> bool:
    if isinstance(op, Zero):
        return True
    if isinstance(op, LowRank):  # from its factors, without forming U M Uᵀ
        return not (bool(op.U.any()) and bool(op.M.any()))
    return not bool(op.to_dense().any())


def _mm(A, x: Tensor) -> Tensor:
    """``A x`` for a dense tensor (wide where ``x`` is a thin block:
    :func:`~tallskinny.linalg.thin.thin_product`) or an operator (unchecked: shapes are
    known to fit)."""
    return thin_product(A, x) if isinstance(A, Tensor) else A.matmat(x)


def _gvt_product(GVt, S: Tensor) -> tuple[Tensor, bool]:
    """``G_Vᵀ S``, and whether it is in a buffer of the workspace pool (the caller gives
    it back): so for ``G_Vᵀ = I_m ⊗ B`` (a convolution's span, channel-major), one
    batched product."""
    B = identity_kronecker_factor(GVt) if DenseStage.use_structure and not isinstance(GVt, Tensor) else None
    if B is None or not S.is_contiguous():
        return _mm(GVt, S), False
    m, N = S.shape[0] // B.shape[1], S.shape[1]
    out = workspace.empty((m * B.shape[0], N), S)
    torch.matmul(B, S.view(m, B.shape[1], N), out=out.view(m, B.shape[0], N))
    return out, True


class DenseStage(Stage):
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

    ``complement_rows`` (``c × a_in``) are rows ``C_c`` of ``C`` on parameter directions
    that another stage eliminates with pivots ``ε`` (an affine block's complement, which
    its :class:`~tallskinny.elimination.stages.reduced_affine.ReducedAffineStage` counts
    and sweeps): ``C_cᵀC_c/ε`` is subtracted here, formed in one product with the rest's
    ``C_⊥ᵀC_⊥`` (on the live inputs only, next to ReLUs).
    """

    #: Exploit ``G = I_m ⊗ B`` spans and dead ReLU units (``False``: the plain dense path,
    #: the reference the tests compare with; see :func:`tallskinny.testing.plain_dense_stages`).
    use_structure = True

    def __init__(
        self,
        oracle: Oracle,
        ignored_rows: Tensor | None = None,
        output_range: Tensor | None = None,
        *,
        orthogonal_columns: bool = False,
        zero_inputs: Tensor | None = None,
        complement_rows: Tensor | None = None,
    ):
        keep_structure = orthogonal_columns and ignored_rows is None and output_range is None
        # G = I_m ⊗ B with rows dropped (a convolution's span at one sample, dead ReLU
        # units): the SVD splits into m small ones, one per diagonal block
        structured = self.use_structure
        B = identity_kronecker_factor(oracle.G) if structured and ignored_rows is not None and output_range is None else None
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
        a_in = oracle.C.shape[1]
        # products of a damping on the live rows and columns only (see live_products);
        # then everything of C is computed and kept on the live inputs (``inputs``)
        live = structured and ignored_rows is not None and congruence_is_dense(self.F) and isinstance(self.E, Zero)
        li = (~zero_inputs).nonzero().squeeze(1) if live and zero_inputs is not None else None
        C = oracle.C.to_dense() if li is None else oracle.C.dense_block(None, li)
        kw = dict(dtype=C.dtype, device=C.device)
        GV_live_blocks = None
        if keep_structure:
            # the row space of G is everything: V = I, kept implicit (V is None); G keeps
            # whatever operator structure it has (products with it are all we need)
            r = p
            self.V = None
            self.GV = G
            self.C_r = C
        elif B is not None:
            V_blocks, self.GV, self.g_norm, GV_live_blocks = masked_kronecker_basis(B, ignored_rows)
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
            A = symmetrize(A.to_dense())
            self.a_norm = float(torch.linalg.vector_norm(A))  # ‖A‖_F ≥ ‖A‖₂
            V_perp = torch.linalg.qr(V, mode="complete")[0][:, r:] if r else torch.eye(p, **kw)
            self.alpha, W = torch.linalg.eigh(V_perp.mT @ A @ V_perp)
            self.Z = V_perp @ W  # p × (p − r)
            AV = A @ V
            self.A_rr = V.mT @ AV
            self.A_rz = AV.mT @ self.Z
        elif not a_zero:  # null(G) = {0}
            A = symmetrize(A.to_dense())
            self.a_norm = float(torch.linalg.vector_norm(A))
            self.A_rr = V.mT @ A @ V
        self.k = 0 if self.Z is None else self.Z.shape[1]
        if self.Z is not None:
            self.C_z = self.Z.mT @ C  # k × a_in
        self.n_rest = p - r - self.k
        self.C_rest = None
        gram_rows = [] if complement_rows is None else [complement_rows if li is None else complement_rows.index_select(1, li)]
        if self.n_rest:
            # C on the rest, in ambient coordinates: (I − VVᵀ − ZZᵀ) C
            C_rest = C - (VC_r if B is not None else V @ self.C_r) if r else C
            if self.Z is not None:
                C_rest = C_rest - self.Z @ self.C_z
            self.C_rest = C_rest
            gram_rows.append(C_rest)
        # Σ C_ᵢᵀC_ᵢ over the rest and the complement rows (pivots ε on both); symmetric up
        # to rounding, which the symmetrization of the new S at the end of _schur removes
        self.CtC = None
        for rows in gram_rows:
            self.CtC = rows.mT @ rows if self.CtC is None else self.CtC.addmm_(rows.mT, rows)
        #: the inputs on which ``C_r``, ``C_z``, ``C_rest`` and the factors' ``Q_ζy``, ``K``
        #: are kept (the others are zero: dead ReLU units before the block); ``None``: all
        self.inputs = li if li is not None and li.shape[0] < a_in else None
        self.live = None
        if live:
            li = torch.arange(a_in, device=C.device) if li is None else li
            self.live = self.live_products(ignored_rows, li, GV_live_blocks)

    def live_products(self, ignored_rows: Tensor, li: Tensor, GV_blocks: list[Tensor] | None = None):
        """Where the outputs ``ignored_rows`` are dropped, the value Hessian ``S`` arriving
        here is exactly zero on them, and where an input is identically zero (a ReLU's dead
        unit before this block; ``li`` are the others) nothing computed for it is ever
        read: the dense products of a damping then run on the live rows and columns only
        (``O(n_out²·n_in)`` instead of ``O(a_out²·a_in)``). Returns the live indices and
        ``F``, ``G_V``, ``C_r``, ``C_⊥ᵀC_⊥``, ``C_z`` on them (the ``C`` parts are already
        computed on the live inputs). ``G_V`` on the live rows is a dense matrix, or, given its
        channels' blocks ``GV_blocks`` (a convolution's span, block diagonal: the live rows
        come channel by channel), the list of ``(first row, end row, block)``."""
        lo = (~ignored_rows).nonzero().squeeze(1)
        F_oi = self.F.dense_block(lo, li)
        if GV_blocks is None:
            GV_o = self.GV.index_select(0, lo)
        else:
            ends = torch.tensor([blk.shape[0] for blk in GV_blocks]).cumsum(0).tolist()
            GV_o = [(end - blk.shape[0], end, blk) for end, blk in zip(ends, GV_blocks)]
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
        U, M = A.U, symmetrize(A.M)
        p, r = U.shape[0], V.shape[1]
        VtU = V.mT @ U  # r × k
        vtu_norm = float(torch.linalg.matrix_norm(VtU, 2)) if VtU.numel() else 0.0
        if r:
            self.A_rr = symmetrize(VtU @ M @ VtU.mT)
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
        self.alpha, W = torch.linalg.eigh(symmetrize(SW.mT @ M @ SW))
        Z_n = Ut[:, :k] @ W
        if reflectors is None:
            self.Z = Z_n
        else:  # Q [0; Z_n]: orthonormal, orthogonal to range(V) to working precision
            self.Z = torch.ormqr(*reflectors, torch.cat((Z_n.new_zeros(r, k), Z_n)), left=True, transpose=False)
        if r:
            self.A_rz = VtU @ M @ (SW @ W)  # UᵀZ = W̃Σ W on the kept part: r × k'

    # -- elimination -------------------------------------------------------------------------
    @property
    def takes_supported(self) -> bool:
        return self.live is not None

    def eliminate(self, S: Tensor | Supported, damping: float, index: int):
        if self.live is not None:
            return self._eliminate_live(S, damping, index)
        GtS, pooled = _gvt_product(self.GVt, S)  # G_VᵀS
        SGV = GtS.mT  # S G_V = (G_VᵀS)ᵀ: S is symmetric
        if congruence_is_dense(self.F):
            # no Kronecker or diagonal structure: SF once gives both FᵀSF and
            # Q_ζy = C + G_VᵀSF, instead of a second product with Fᵀ. Through F's own
            # factors where they are cheap (a convolution: SF = (FᵀS)ᵀ, S symmetric), else
            # with F dense (a fallback block; SF and the new S in buffers of the pool)
            pooled_SF = not products_through_factors(self.F)
            if pooled_SF:
                Fd = self.F.to_dense()
                SF = torch.mm(S, Fd, out=workspace.empty((S.shape[0], Fd.shape[1]), S))
                S_new = plus(self.E, torch.mm(Fd.mT, SF, out=workspace.empty((Fd.shape[1],) * 2, S)))
            else:
                SF = self.FT.matmat(S).mT
                S_new = plus(self.E, self.FT.matmat(SF))
            GtSF = _mm(self.GVt, SF)
            # Q_ζy = C + G_VᵀSF, in place where the product is a new tensor
            shared = GtSF.untyped_storage().data_ptr() == SF.untyped_storage().data_ptr()
            Q_ry = GtSF + self.C_r if shared else GtSF.add_(self.C_r)  # r × a_in
            if pooled_SF:
                workspace.give(SF)
        else:
            Q_ry = self.C_r + self.FT.matmat(SGV).mT  # r × a_in
            S_new = plus(self.E, congruence(self.F, S))  # Q_yy, then its Schur complement
        Q_rr = self.GVt @ SGV
        if pooled:
            workspace.give(GtS)
        S_norm = torch.linalg.vector_norm(S) if self.A_rr is not None else None
        S_new, factor, Y_r, d, inertia, logdet = self._schur(S_new, Q_rr, Q_ry, self.C_z, self.CtC, damping, index, S_norm)
        return S_new, DenseStageFactor(self, damping, d, factor, Q_ry, Y_r, inertia, logdet)

    def _eliminate_live(self, S: Tensor, damping: float, index: int):
        """:meth:`eliminate` on the live rows and columns (see ``live_products``);
        ``Q_ζy`` and ``K`` are kept on the live inputs, and the new ``S`` is zero on the
        dead ones, which no later step reads (a :class:`Supported`)."""
        lo, li, F_oi, GV_o, C_ri, CtC_ii, C_zi = self.live
        # (a Supported S from the stage after: the ReLU's live units are these outputs)
        S_oo = S.block(lo) if isinstance(S, Supported) else S.index_select(0, lo).index_select(1, lo)
        SF = S_oo @ F_oi
        if isinstance(GV_o, Tensor):
            Q_ry = torch.addmm(C_ri, GV_o.mT, SF)  # r × n_in
            Q_rr = GV_o.mT @ (S_oo @ GV_o)
        else:  # G_V block diagonal: one product per channel's block
            Q_ry = torch.cat([blk.mT @ SF[a:b] for a, b, blk in GV_o]).add_(C_ri)
            SG = torch.cat([S_oo[:, a:b] @ blk for a, b, blk in GV_o], dim=1)
            Q_rr = torch.cat([blk.mT @ SG[a:b] for a, b, blk in GV_o])
        S_norm = torch.linalg.vector_norm(S_oo) if self.A_rr is not None else None
        S_ii, factor, Y_r, d, inertia, logdet = self._schur(F_oi.mT @ SF, Q_rr, Q_ry, C_zi, CtC_ii, damping, index, S_norm)
        S_new = S_ii if self.inputs is None else Supported(S_ii, li, self.F.shape[1])
        return S_new, DenseStageFactor(self, damping, d, factor, Q_ry, Y_r, inertia, logdet)

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
                raise_if_null_directions(self.C_rest, index)
                raise StageSingular(index)
            # (a negative ε — a shift — makes these pivots negative)
            pos, neg = (self.n_rest, 0) if damping > 0 else (0, self.n_rest)
            logdet = self.n_rest * math.log(abs(damping))
        if CtC is not None and damping != 0.0:  # (at ε = 0 the complement's owner raises)
            S_new.add_(CtC, alpha=-1.0 / damping)  # (S_new is always a fresh tensor here)
        if self.k:
            # α carries rounding errors of ‖A‖ times two sums of length p (ZᵀAZ, Z orthogonal
            # to range(V) to working precision, not exactly), ε none: Weyl bounds |α + ε| by
            # them where α + ε = 0 in exact arithmetic
            d = self.alpha + damping
            tol = pivot_tolerance(2 * self.p, S_new.dtype, max(self.a_norm, float(self.alpha.abs().max())))
            if bool((d.abs() <= tol).any()) or bool((d == 0).any()):
                raise StageSingular(index)
            S_new -= C_z.mT @ (C_z / d.unsqueeze(-1))
            pos, neg = pos + int((d > 0).sum()), neg + int((d < 0).sum())
            z_logdet = d.abs().log().sum()
            logdet = z_logdet if logdet is None else z_logdet + logdet
            if self.A_rz is not None:
                Ad = self.A_rz / d
                AdA = Ad @ self.A_rz.mT
                terms.append(max_abs(AdA))
                Qt_rr = Q_rr - AdA
                Qt_ry = Q_ry - Ad @ C_z
        factor = Y_r = None
        if self.r:
            # ‖ΔQ‖ ≤ γ_k·(terms) with k = 4(p + a): two products over a, two over p, and the SVD
            factor = SymmetricFactor.of(Qt_rr, terms, 4 * (self.p + self.GV.shape[0]), half=True)
            if factor is None:
                raise StageSingular(index)
            X_r, Y_r = factor.schur_operands(Qt_ry)  # Q_yθ Q_θθ⁻¹ Q_θy = X_rᵀ Y_r
            S_new = subtract_schur(S_new, X_r, Y_r, factor.symmetric_schur)  # symmetric
        else:
            S_new = symmetrize(S_new)
        return S_new, factor, Y_r, d, (pos, neg), logdet


def masked_kronecker_basis(B: Tensor, ignored_rows: Tensor) -> tuple[list[Tensor], Tensor, float, list[Tensor]]:
    """``(V's diagonal blocks, G V, ‖G‖₂, G V's diagonal blocks on the live rows)`` for
    ``G = I_m ⊗ B`` (``B``: ``R × q``) with the rows ``ignored_rows`` set to zero: ``G`` is
    block diagonal, so its thin SVD is that of its ``m`` blocks, each on its live rows only
    (``m`` SVDs of ``n_live × q`` instead of one of ``m·R × m·q``), with the rank tolerance
    of the whole matrix, ``max(a, p)·eps·σ_max``; ``‖G‖₂ = σ_max``, the largest of the
    blocks'. ``G V = UΣ`` has orthogonal columns, so the span pivot ``Q = (GV)ᵀS(GV) + εI``
    is a diagonal scaling of ``UᵀSU`` (a basis from a QR of the live rows, without the SVD,
    was tried and lost that: CHANGELOG)."""
    R, q = B.shape
    m = ignored_rows.numel() // R
    live = [torch.nonzero(~dead).squeeze(1) for dead in ignored_rows.reshape(m, R)]
    svds = [torch.linalg.svd(B.index_select(0, rows), full_matrices=False) for rows in live]
    sigma_max = max((float(s.max()) for _, s, _ in svds if s.numel()), default=0.0)
    tol = pivot_tolerance(m * max(R, q), B.dtype, sigma_max)
    V_blocks, live_blocks = [], []
    for U, sigma, Vh in svds:
        k = int((sigma > tol).sum())  # singular values come sorted
        V_blocks.append(Vh[:k].mT)
        live_blocks.append(U[:, :k] * sigma[:k])  # G V on this channel's live rows
    return V_blocks, _embedded_blocks(live, live_blocks, R), sigma_max, live_blocks


def _embedded_blocks(live: list[Tensor], blocks: list[Tensor], R: int) -> Tensor:
    """The block diagonal ``G V``: each channel's block on its live rows of ``R``, zero on
    the dead ones."""
    out = []
    for rows, block in zip(live, blocks):
        full = block.new_zeros(R, block.shape[1])
        full[rows] = block
        out.append(full)
    return torch.block_diag(*out)


class DenseStageFactor(StageFactor):
    """The per-damping factors of a :class:`DenseStage`, used by the solve sweeps: the
    span pivot's factor, ``Q_ζy`` and ``Y_r`` with ``Q_θθ⁻¹ Q_ζy y = factor.complete(Y_r y)``
    (:meth:`~tallskinny.elimination.algebra.SymmetricFactor.schur_operands`)."""

    __slots__ = ("stage", "damping", "d", "factor", "Q_ry", "Y_r", "_z_inertia", "_z_logdet")

    def __init__(self, stage, damping, d, factor, Q_ry, Y_r, z_inertia, z_logdet):
        self.stage, self.damping, self.d, self.factor, self.Q_ry, self.Y_r = stage, damping, d, factor, Q_ry, Y_r
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

    def pivot_factors(self) -> tuple:
        return () if self.factor is None else (self.factor,)

    def span_pivot(self):
        return self.factor if isinstance(self.factor, SymmetricFactor) and self.stage.A_rr is None else None

    def backward(self, t: Tensor | None, b: Tensor):
        """``u = Q_θθ⁻¹(Gᵀt − b)`` in (span, Z, rest) parts, and the new ``t``."""
        st = self.stage
        u_r = u_z = u_rest = None
        Zb = thin_product(st.Z.mT, b) if st.k else None
        Vb = None if st.V is None else thin_product(st.V.mT, b)
        q_z = -Zb if st.k else None
        if st.r:
            q_r = -(b if st.V is None else Vb)
            if t is not None:
                q_r = q_r + _mm(st.GVt, t)
            if st.A_rz is not None:
                q_r = q_r - (st.A_rz / self.d) @ q_z
            u_r = self.factor.solve(q_r)
        if st.k:
            u_z = q_z if st.A_rz is None else q_z - st.A_rz.mT @ u_r
            u_z = u_z / self.d.unsqueeze(-1)
        if st.n_rest:  # −b on the rest, over ε
            rest = b if st.V is None else b - thin_product(st.V, Vb)
            if st.k:
                rest = rest - thin_product(st.Z, Zb)
            u_rest = rest / -self.damping
        t_new = None if t is None else st.FT.matmat(t)
        w = None  # Q_ζyᵀu on the inputs the stage keeps
        if u_r is not None:
            w = thin_product(self.Q_ry.mT, u_r)
        if u_z is not None:
            w = _add(w, thin_product(st.C_z.mT, u_z))
        if u_rest is not None:
            w = _add(w, thin_product(st.C_rest.mT, u_rest))
        if w is not None and st.inputs is not None:  # zero on the dead inputs
            t_new = b.new_zeros(st.F.shape[1], b.shape[1]) if t_new is None else t_new
            return (u_r, u_z, u_rest), t_new.index_add(0, st.inputs, w, alpha=-1.0)
        return (u_r, u_z, u_rest), t_new if w is None else _sub(t_new, w)

    def forward(self, y: Tensor | None, u):
        """``θ = −Q_θθ⁻¹(Q_θy y + q)`` in ambient coordinates, and the new ``y``."""
        st = self.stage
        u_r, u_z, u_rest = u
        theta = theta_r = None
        y_in = y if y is None or st.inputs is None else y.index_select(0, st.inputs)
        Ky = None if y is None or not st.r else self.factor.complete(thin_product(self.Y_r, y_in))
        if st.r:
            theta_r = -u_r if y is None else -Ky - u_r
            theta = theta_r if st.V is None else thin_product(st.V, theta_r)
        if st.k:
            theta_z = -u_z
            if y is not None:
                w = thin_product(st.C_z, y_in)
                if st.A_rz is not None:
                    w = w - st.A_rz.mT @ Ky
                theta_z = theta_z - w / self.d.unsqueeze(-1)
            theta_z = thin_product(st.Z, theta_z)
            theta = theta_z if theta is None else theta + theta_z
        if st.n_rest:
            theta_rest = -u_rest if y is None else -u_rest - thin_product(st.C_rest, y_in) / self.damping
            theta = theta_rest if theta is None else theta + theta_rest
        y_new = None if y is None else st.F.matmat(y)
        if theta_r is not None:
            gy = _mm(st.GV, theta_r)
            y_new = gy if y_new is None else y_new + gy
        return theta, y_new


def _sub(a: Tensor | None, b: Tensor) -> Tensor:
    return -b if a is None else a - b


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b
