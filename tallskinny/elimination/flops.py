"""The floating-point operations of one factorization and one solve, stage by stage.

Counted from the prepared stages (:func:`~tallskinny.elimination.prepare.prepare_stages`),
so with the sizes the engine uses: the rank ``r`` of each span, the live rows and columns
next to a ReLU's dead units, the runs. Conventions: a product of ``m × k`` by ``k × n``
is ``2mkn``; a Cholesky of ``n × n`` is ``n³/3``, an LU ``2n³/3``, the eigenvalues of a
symmetric ``n × n`` ``4n³/3``; a solve with a factored ``n × n`` pivot and ``k`` columns
``2n²k``. Elementwise work (``O(a²)`` a stage: ``εI``, ``S ⊙ ddᵀ``, symmetrising) and the
stage preparation (SVDs of ``X̃`` and ``G``, once per curvature) are not counted.

A stage turns the value Hessian ``S`` (``a_out × a_out``) into the one at its input
(``a_in × a_in``) with a span pivot of size ``n``:

    Q_ζζ = G_VᵀSG_V + εI     Q_ζy = C_V + G_VᵀSF     S ← E + FᵀSF − Q_ζyᵀ Q_ζζ⁻¹ Q_ζy

* ``products`` — the matrix products as the code forms them: ``SF`` (``2a_out²a_in`` for a
  dense ``F``, ``a_out·f`` through the factors of an ``F`` whose product costs ``f`` per
  column, a convolution's), ``Fᵀ(SF)`` (``2a_in²a_out``, or ``a_in·f``), ``G_VᵀS`` and ``(G_VᵀS)G_V`` (``g``
  flops a column each, ``g = 2·a_out·n`` dense, ``2·R·r·m`` for ``G_V = I_m ⊗ X̃V``),
  the Schur update ``Q_ζyᵀK`` (``2a_in²n``; the dense stage's, symmetric by construction,
  ``¾`` of it from ``a_in = 256`` on: ``algebra.subtract_schur``), and what the stage adds to them (a ReLU's
  live rows ``ℓ_out`` and columns ``ℓ_in`` replace ``a_out``, ``a_in``, and the products
  with ``G_V`` count its nonzeros there: a convolution's is block diagonal by channel);
* ``pivots`` — the factorization of ``Q_ζζ``: LU ``2n³/3`` (Cholesky ``n³/3`` where the
  curvature is positive semidefinite, ``cholesky=True``; a Hessian's pivot that is
  positive definite is factored by Cholesky too, so there the count is high by ``n³/3``;
  on the CPU from ``n = 384`` the dense stage's ``LDLᵀ`` or Cholesky ``n³/3``),
  the eigenvalues ``4n³/3`` where ``A ≠ 0`` tests them and those of the last span pivot
  (``n ≤ 128``: the free lower bound of ``‖H‖``);
* ``triangular`` — ``K = Q_ζζ⁻¹Q_ζy``: ``2n²a_in``; on the CPU from ``n = 384`` the dense stage's
  ``M = L⁻¹Q_ζy`` only, ``n²a_in`` (``Q_ζyᵀQ⁻¹Q_ζy = MᵀD⁻¹M``);
* ``lower`` — the same elimination done with no redundancy: products whose result is
  symmetric (``FᵀSF``, ``Q_ζζ``, ``Q_ζyᵀK``) at half their price, ``LDLᵀ`` or Cholesky
  ``n³/3`` and one triangular solve ``n²a_in`` (``Q_ζyᵀQ⁻¹Q_ζy = MᵀD⁻¹M`` with
  ``M = L⁻¹Q_ζy``). ``F``'s products are counted as the code does them;
* ``solve`` — one right-hand side: the two sweeps' products with the stage's matrices
  (``Q_ζy``, ``K`` (the dense stage: ``D⁻¹M`` and a third triangular solve), ``F``, ``V`` (three times where
  there is a rest), ``G_V``, the pivot's two triangular solves ``2n²``),
  counted as if ``y`` and ``t`` were nonzero at every stage (the first and last stages
  skip a few).

For a run of ``J`` one-sample Linear layers of ``W`` (``m × w``) a layer costs
``SW, WᵀSW, Q_ζyᵀK`` (``2m²w + 4mw²``), the rank-one ``C`` terms (``2w² + 2mw``), an LU
``2m³/3`` and ``K`` ``2m²w``. At ``ε = 0`` a stage with a complement sends the
factorization to the pivoted KKT system, which is not counted here.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch

from ..linalg import Diagonal, LinearOperator, ScaledIdentity, Zero
from ..linalg.kronecker import identity_kronecker_factor
from . import algebra
from .algebra import congruence_is_dense, products_through_factors
from .stages.activation import ActivationStage
from .stages.affine import AffineStage
from .stages.covered import CoveredStage
from .stages.dense import DenseStage
from .stages.permuted import PermutedStage
from .stages.reduced_affine import ReducedAffineStage
from .stages.run import LinearRunStage


@attrs.frozen
class StageFlops:
    """The operations of one stage (see the module docstring): ``products``, ``pivots``
    and ``triangular`` of one factorization, their ``lower`` bound, ``solve`` for one
    right-hand side, and ``size``, the largest dimension of its dense products."""

    index: int
    kind: str
    products: int = 0
    pivots: int = 0
    triangular: int = 0
    lower: int = 0
    solve: int = 0
    size: int = 0

    @property
    def factorize(self) -> int:
        return self.products + self.pivots + self.triangular


@attrs.frozen
class EliminationFlops:
    """The operations of one factorization and of a solve of ``columns`` right-hand sides."""

    stages: tuple[StageFlops, ...]
    columns: int = 1

    @property
    def factorize(self) -> int:
        """``Σ products + pivots + triangular``."""
        return sum(s.factorize for s in self.stages)

    @property
    def products(self) -> int:
        return sum(s.products for s in self.stages)

    @property
    def solve(self) -> int:
        return self.columns * sum(s.solve for s in self.stages)

    @property
    def total(self) -> int:
        """A factorization and a solve."""
        return self.factorize + self.solve

    @property
    def lower(self) -> int:
        """The lower bound of the factorization, plus the solve."""
        return sum(s.lower for s in self.stages) + self.solve

    @property
    def size(self) -> int:
        """The largest dimension of any stage's dense products (0: none)."""
        return max((s.size for s in self.stages), default=0)


class _Count:
    """An accumulator: products (``symmetric``: the result is symmetric, half in the
    lower bound), pivots and triangular solves."""

    def __init__(self, cholesky: bool):
        self.cholesky = cholesky
        self.products = self.halved = self.pivots = self.pivots_lower = self.triangular = self.triangular_lower = self.solve = 0
        self.size = self.pivot_size = 0

    def mm(self, flops: int, symmetric: bool = False) -> None:
        self.products += flops
        if symmetric:
            self.halved += flops // 2

    def pivot(self, n: int, columns: int, *, lu: bool = False, eigenvalues: bool = False, half: bool = False) -> None:
        """``Q_ζζ`` (``n × n``) factored and solved for ``columns`` columns (``half``: a
        symmetric factorization, ``LDLᵀ`` or Cholesky, whose Schur complement takes one
        triangular solve, and each solve's forward sweep a third)."""
        symmetric = half or (self.cholesky and not lu)
        self.pivots += (n**3 // 3 if symmetric else 2 * n**3 // 3) + (4 * n**3 // 3 if eigenvalues else 0)
        self.pivots_lower += n**3 // 3 + (4 * n**3 // 3 if eigenvalues else 0)
        self.triangular += (1 if half else 2) * n * n * columns
        self.triangular_lower += n * n * columns
        self.solve += (3 if half else 2) * n * n
        self.size = max(self.size, n)
        self.pivot_size = n

    def stage(self, index: int, kind: str) -> StageFlops:
        lower = self.products - self.halved + self.pivots_lower + self.triangular_lower
        return StageFlops(index, kind, self.products, self.pivots, self.triangular, lower, self.solve, self.size)


def apply_flops(op: LinearOperator | torch.Tensor) -> int:
    """Flops of ``op x`` for one column, as the engine applies ``op``
    (:meth:`~tallskinny.linalg.LinearOperator.apply_flops`; ``2·rows·cols`` for a tensor)."""
    if isinstance(op, torch.Tensor):
        return 2 * op.numel()
    return op.apply_flops()


def congruence_flops(F: LinearOperator) -> tuple[int, int]:
    """``(FᵀSF, SF)`` flops of :func:`~tallskinny.elimination.algebra.congruence` (``SF``
    the part whose result is not symmetric)."""
    a_out, a_in = F.shape
    if isinstance(F, (Zero, Diagonal, ScaledIdentity)):
        return 0, 0
    W = identity_kronecker_factor(F)
    m = W.shape[0] if W is not None else a_out
    # (I_R ⊗ W)ᵀS(I_R ⊗ W): S(I ⊗ W) 2·a_out·a_in·m, then (I ⊗ W)ᵀ· 2·a_in²·m
    return 2 * a_in * a_in * m, 2 * a_out * a_in * m


def _activation(stage: ActivationStage, c: _Count) -> None:
    F = stage.F
    sym, half = congruence_flops(F)  # zero for a diagonal F
    c.mm(half)
    c.mm(sym, symmetric=True)
    if sym:
        c.size = max(c.size, *F.shape)
    c.solve += 2 * apply_flops(F)


def _affine(stage: AffineStage, c: _Count) -> None:
    R, m, r, q = stage.R, stage.m, stage.r, stage.q
    a_in = stage.F.shape[1]
    a_out = R * m
    n = r * m
    F_apply = apply_flops(stage.F)
    if stage.W is not None:  # one sample: G_V = σI, F = W (a_out × a_in)
        c.mm(2 * a_out * a_out * a_in)  # SW
        c.mm(2 * a_in * a_in * a_out, symmetric=True)  # Wᵀ(SW)
        c.pivot(n, a_in, lu=True)  # LU, unchecked
        c.mm(2 * a_in * a_in * n, symmetric=True)  # Q_ζyᵀK
    elif stage.kron_W is not None:  # F = I_R ⊗ W
        w = stage.kron_W.shape[1]
        c.mm(2 * r * R * m * a_out)  # G_VᵀS
        c.mm(2 * R * n * n, symmetric=True)  # Q_ζζ
        c.mm(2 * n * R * m * w)  # Q_ζy = (G_VᵀS)F
        c.mm(2 * a_out * R * m * w)  # SF
        c.mm(2 * R * R * w * m * w, symmetric=True)  # Fᵀ(SF)
        c.pivot(n, a_in)
        c.mm(2 * a_in * a_in * n, symmetric=True)  # Q_ζyᵀK
    else:
        sym, half = congruence_flops(stage.F)
        c.mm(half)
        c.mm(sym, symmetric=True)
        if r:
            g = 0 if stage.scalar is not None else 2 * R * r * m
            c.mm(g * a_out)  # S G_V
            c.mm(g * n, symmetric=True)  # Q_ζζ
            c.mm(apply_flops(stage.F) * n)  # Q_ζy = Fᵀ(SG_V)
            c.pivot(n, a_in)
            c.mm(2 * a_in * a_in * n, symmetric=True)
    c.size = max(c.size, a_out, a_in, n)
    # the sweeps: V (q × r) thrice on m columns, G_V twice, Q_ζy and K, F twice, Cᵀ/C_⊥ twice
    c.solve += 6 * q * r * m + (0 if stage.scalar is not None else 4 * R * r * m) + 4 * n * a_in + 2 * F_apply
    if stage.n_perp and stage.coupled:
        c.solve += _complement_solve(stage, a_in, one_sample=True)


def _complement_solve(stage, a_in: int, one_sample: bool = False) -> int:
    """The sweeps' products with ``C_⊥`` (``Cᵀb_⊥`` backwards, ``C_⊥y`` forwards);
    ``one_sample``: an :class:`AffineStage`'s shortcuts for one right-hand side."""
    q, r, m, R = stage.q, stage.r, stage.m, stage.R
    if stage.C_span is not None:  # C_c ((q − r)·m × a_in) and V_⊥ (q × (q − r)), each way
        return 4 * (q - r) * m * a_in + 4 * q * (q - r) * m
    n = stage.Et.shape[1]
    if one_sample and stage.fused:  # one sample, Ẽ = [I; 0], Γ = g: b_⊥g, (I − vvᵀ)Ẽy and its product with gᵀ
        return 2 * n * m + 2 * q * n + 2 * q * m
    E = 0 if stage.pad else 2 * n * q * m  # Ẽ (q × n) on m columns
    forward = 2 * r * n * m + 2 * q * r * m if one_sample and stage.pad else E + 4 * q * r * m
    return E + 2 * R * m * n + 2 * m * R * n + forward


def _dense(stage: DenseStage, c: _Count) -> None:
    r, k = stage.r, stage.k
    a_out, a_in = stage.F.shape
    if stage.live is not None:
        lo, li = stage.live[0].numel(), stage.live[1].numel()
        GV_o = stage.live[3]  # G_V on the live rows: dense, or its channels' blocks
        g = GV_o.numel() if isinstance(GV_o, torch.Tensor) else sum(blk.numel() for _, _, blk in GV_o)
        c.mm(2 * lo * lo * li)  # S_oo F_oi
        c.mm(2 * g * li)  # Q_ζy
        c.mm(2 * lo * g)  # S_oo G_V
        c.mm(2 * r * g, symmetric=True)  # Q_ζζ
        c.mm(2 * li * li * lo, symmetric=True)  # F_oiᵀ(SF)
        a_eff = li
        c.size = max(c.size, lo, li, r)
    else:
        g = apply_flops(stage.GVt)  # G_Vᵀ on one column
        c.mm(g * a_out)  # G_VᵀS
        if congruence_is_dense(stage.F) and products_through_factors(stage.F):
            f = apply_flops(stage.F)  # a convolution: through F's factors
            c.mm(f * a_out)  # SF = (FᵀS)ᵀ
            c.mm(f * a_in)  # Fᵀ(SF)
            c.mm(g * a_in)  # G_Vᵀ(SF)
        elif congruence_is_dense(stage.F):
            c.mm(2 * a_out * a_out * a_in)  # SF
            c.mm(2 * a_in * a_in * a_out, symmetric=True)  # Fᵀ(SF)
            c.mm(g * a_in)  # G_Vᵀ(SF)
        else:
            sym, half = congruence_flops(stage.F)
            c.mm(half)
            c.mm(sym, symmetric=True)
            c.mm(apply_flops(stage.F) * r)  # Fᵀ(SG_V)
        c.mm(g * r, symmetric=True)  # Q_ζζ
        a_eff = a_in
        c.size = max(c.size, a_out, a_in, r)
    if k:
        c.mm(2 * a_eff * a_eff * k, symmetric=True)  # C_zᵀ d⁻¹ C_z
        if stage.A_rz is not None:
            c.mm(2 * r * k * r, symmetric=True)
            c.mm(2 * r * k * a_eff)
    if r:
        # on the CPU from HALF_SOLVE_MIN_ORDER on, LDLᵀ or Cholesky: (L⁻¹Q_ζy)ᵀ D⁻¹(L⁻¹Q_ζy),
        # its upper blocks from SPLIT_SCHUR_MIN on; else LU (or Cholesky) and Q_ζyᵀK
        half = r >= algebra.HALF_SOLVE_MIN_ORDER and stage.F.device.type == "cpu"
        c.pivot(r, a_eff, eigenvalues=stage.A_rr is not None, half=half)
        schur = 2 * a_eff * a_eff * r
        if half and a_eff >= algebra.SPLIT_SCHUR_MIN:
            h = a_eff // 2
            upper = 2 * (h * h + (a_eff - h) ** 2 + h * (a_eff - h)) * r
            c.mm(upper)
            c.halved += upper - schur // 2  # (the lower bound stays half the whole product)
        else:
            c.mm(schur, symmetric=True)
    # the sweeps: G_V twice, V twice, Q_ζy and K, F twice, Z and C_z, the rest's C
    p = stage.p
    V = 0 if stage.V is None else 2 * p * r
    kept = a_in if stage.inputs is None else stage.inputs.numel()  # the columns C's parts are kept on
    rest = 1 if stage.n_rest else 0  # b's part on the rest: b − V(Vᵀb) − Z(Zᵀb)
    c.solve += 2 * apply_flops(stage.GVt) + (2 + rest) * V + 4 * r * kept + 2 * apply_flops(stage.F)
    c.solve += (4 + 2 * rest) * p * k + 4 * k * kept + (4 * p * kept if stage.n_rest else 0)


def _reduced(stage: ReducedAffineStage, c: _Count) -> None:
    inner = stage.inner
    if isinstance(inner, DenseStage):
        _dense(inner, c)
    else:
        _activation(inner, c)
    c.solve += 4 * stage.q * stage.r * stage.m  # Vᵀ and V on m columns
    if stage.n_perp:
        c.solve += 2 * stage.q * stage.r * stage.m
        if stage.coupled:
            c.solve += _complement_solve(stage, stage.F.shape[1])


def _run(stage: LinearRunStage, c: _Count) -> None:
    J, m, w = stage.J, stage.m, stage.n
    coupled = stage.g_sq is not None
    for _ in range(J):
        c.mm(2 * m * m * w)  # SW
        c.mm(2 * w * m * w, symmetric=True)  # Wᵀ(SW)
        if coupled:
            c.mm(2 * w * w, symmetric=True)  # −‖g‖²vvᵀ/ε
            c.mm(2 * m * w)  # g vᵀ
        c.pivot(m, w, lu=True)
        c.mm(2 * w * m * w, symmetric=True)  # Q_ζyᵀK
    # per layer and column: eight products with m × w matrices (W_b twice, K twice, A twice,
    # g vᵀ), four with vectors
    c.solve += J * (16 * m * w + 2 * m + 4 * w)
    c.size = max(c.size, m, w)


def stage_flops(stages: Sequence, *, columns: int = 1, cholesky: bool = False) -> EliminationFlops:
    """The operations of a factorization of these prepared stages at one damping
    ``ε ≠ 0`` and of a solve of ``columns`` right-hand sides (module docstring);
    ``cholesky``: the pivots are positive definite (a Gauss–Newton matrix)."""
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    out, counts = [], []
    for index, stage in enumerate(stages):
        if isinstance(stage, CoveredStage):
            continue
        c = _Count(cholesky)
        counts.append((stage, c))
        if isinstance(stage, LinearRunStage):
            _run(stage, c)
        elif isinstance(stage, AffineStage):
            _affine(stage, c)
        elif isinstance(stage, ReducedAffineStage):
            _reduced(stage, c)
        elif isinstance(stage, PermutedStage):  # (the permutation: gathers, no flops)
            _dense(stage.inner, c)
        elif isinstance(stage, DenseStage):
            _dense(stage, c)
        elif isinstance(stage, ActivationStage):
            _activation(stage, c)
        else:
            raise TypeError(f"no flop count for a stage of type {type(stage).__name__}")
    # the factorization's free lower bound of ‖H‖: the eigenvalues of the last span pivot
    # (up to 128 × 128; riccati._last_block_norm)
    last = next(((s, c) for s, c in reversed(counts) if s.p), None)
    if last is not None and not isinstance(last[0], LinearRunStage):
        stage, c = last
        inner = stage.inner if isinstance(stage, (ReducedAffineStage, PermutedStage)) else stage
        if c.pivot_size and c.pivot_size <= 128 and not (isinstance(inner, DenseStage) and inner.A_rr is not None):
            c.pivots += 4 * c.pivot_size**3 // 3
    out = [c.stage(index, type(stage).__name__) for index, (stage, c) in zip(
        (i for i, s in enumerate(stages) if not isinstance(s, CoveredStage)), counts)]
    return EliminationFlops(tuple(out), columns)


__all__ = ["EliminationFlops", "StageFlops", "apply_flops", "congruence_flops", "stage_flops"]
