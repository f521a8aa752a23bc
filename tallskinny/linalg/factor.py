"""Factorizations: factor once, solve many, and read off ``log|det|``, sign and inertia.

Every factorization of an ``N × N`` matrix ``M`` offers

* ``solve(rhs)`` — ``M⁻¹ rhs`` for ``rhs`` of shape ``(N,)`` or ``(N, k)``;
* ``logdet()`` — ``log|det M|`` as a 0-dim tensor, and ``sign()`` — ``sign(det M)`` (±1);
* ``inertia()`` — for a symmetric ``M``, the counts of positive, negative and zero
  eigenvalues (Sylvester's law of inertia applied to the factorization); a
  non-symmetric factorization raises :class:`TypeError`.

**Singularity.** A matrix is *singular to working precision* when a pivot (a diagonal
entry of ``U`` in LU, the modulus of an eigenvalue of a 1×1 or 2×2 block of ``D`` in
Bunch–Kaufman, or of an eigen-factored pivot block) is at most
``PIVOT_TOLERANCE_FACTOR · N · eps · scale``,
where ``eps`` is the machine epsilon of the dtype and ``scale`` is the largest absolute
entry of the matrix. The factor ``c = PIVOT_TOLERANCE_FACTOR = 1`` makes the test flag
exactly the matrices whose pivots are at the size of the rounding errors of an
elimination on ``N`` unknowns (``N · eps · scale`` bounds those errors up to growth, and
partial pivoting keeps growth small in practice). Such a matrix raises
:class:`SingularMatrixError` when it is factored, before any solve — never NaN or inf.
Consequently a successful factorization always reports ``inertia().zero == 0``.
The test is exact where the elimination meets a zero (a zero row or column, a decoupled
zero block); a matrix singular only up to rounding has its smallest pivot at the
tolerance, so whether it raises is decided by rounding — when it does not, its
factorization is still backward stable (see ``docs/linalg.md``).
(:class:`BlockDiagonalFactorization` and :class:`BlockBidiagonalFactorization` factor
each diagonal block on its own, so for them the test applies block by block.)
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Sequence

import torch
from torch import Tensor

from .batching import same_shape_batches
from .errors import SingularMatrixError
from .inertia import Inertia
from .lu import LUFactors
from .norms import max_abs

PIVOT_TOLERANCE_FACTOR = 1.0
"""``c`` in the singularity test ``pivot ≤ c · N · eps · max|M_ij|``."""

DEFAULT_ALPHA = 0.25
"""Bunch–Kaufman parameter of :class:`BlockTridiagonalLDL`: a pivot, or one eigen-direction
of a pivot, is eliminated only when its multipliers are at most ``1/α`` in modulus."""

_FLOAT_TYPES = (torch.float32, torch.float64)


def pivot_tolerance(n: int, dtype: torch.dtype, scale: float) -> float:
    """``c · n · eps · scale``: pivots at or below it count as zero (see the module doc).

    The one tolerance of every rank and pivot decision in :mod:`tallskinny` too: singular
    values or eigenvalues at or below ``pivot_tolerance(n, dtype, σ_max)`` count as zero.
    ``c = PIVOT_TOLERANCE_FACTOR`` is read at each call, so tests can move every decision
    at once (:func:`tallskinny.linalg.testing.scaled_tolerances`). ``eps`` is that of
    ``dtype``, or of the dtype :func:`pivot_precision` sets in this thread."""
    return PIVOT_TOLERANCE_FACTOR * n * torch.finfo(_pivot_precision.dtype or dtype).eps * scale


class _PivotPrecision(threading.local):
    dtype: torch.dtype | None = None


_pivot_precision = _PivotPrecision()


@contextlib.contextmanager
def pivot_precision(dtype: torch.dtype):
    """Within it (in this thread), :func:`pivot_tolerance` uses the ``eps`` of ``dtype``
    whatever the matrix's dtype. A float32 factorization that stands in for a float64 one
    (mixed precision, refined in float64) then counts a pivot as zero only where it is
    zero to float64's working precision: a small float32 pivot only slows the refinement,
    whose stall sends the solve to float64."""
    old = _pivot_precision.dtype
    _pivot_precision.dtype = dtype
    try:
        yield
    finally:
        _pivot_precision.dtype = old


# ---------------------------------------------------------------------------------------
class MatrixFactorization:
    """Base class of all factorizations of a square matrix (``tallskinny.linalg``'s; the
    factorization of a curvature is :class:`tallskinny.Factorization`).

    Subclasses set ``shape``, ``dtype``, ``device``, ``symmetric``, implement
    :meth:`_solve` (for a validated ``(N, k)`` tensor) and set ``_logdet`` and
    ``_sign`` (0-dim tensors) and, if symmetric, ``_inertia``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = False
    _logdet: Tensor
    _sign: Tensor
    _inertia: Inertia | None = None

    def _solve(self, rhs: Tensor) -> Tensor:
        raise NotImplementedError

    def solve(self, rhs: Tensor) -> Tensor:
        """``M⁻¹ rhs`` for ``rhs`` of shape ``(N,)`` or ``(N, k)``; the result has its shape."""
        x = _check_solve_rhs(self, rhs)
        out = self._solve(x if x.dim() == 2 else x.unsqueeze(-1))
        if not bool(torch.isfinite(out).all()):
            raise SingularMatrixError(
                f"the solution of this {type(self).__name__} overflowed: the matrix is too "
                "ill-conditioned for this right-hand side in this precision"
            )
        return out if x.dim() == 2 else out.squeeze(-1)

    def logdet(self) -> Tensor:
        """``log|det M|``, a 0-dim tensor."""
        return self._logdet

    def sign(self) -> Tensor:
        """``sign(det M)`` (``+1`` or ``-1``), a 0-dim tensor of the matrix's dtype."""
        return self._sign

    def slogdet(self) -> tuple[Tensor, Tensor]:
        """``(sign, log|det|)`` like :func:`torch.linalg.slogdet`."""
        return self._sign, self._logdet

    def inertia(self) -> Inertia:
        """``Inertia(positive, negative, zero)`` of a symmetric matrix (Sylvester's law)."""
        if not self.symmetric or self._inertia is None:
            raise TypeError(
                f"inertia() needs a symmetric matrix; this {type(self).__name__} factors a "
                "non-symmetric one (declare symmetry, e.g. Dense(..., symmetric=True) or "
                "SymmetricBlockTridiagonal)"
            )
        return self._inertia

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


# ---------------------------------------------------------------------------------------
class DenseFactorization(MatrixFactorization):
    """A dense square matrix, factored by LAPACK.

    * ``symmetric=False``: LU with partial pivoting, ``P M = L U``
      (:func:`torch.linalg.lu_factor_ex`); ``det M = det P · ∏ u_kk``.
    * ``symmetric=True``: Bunch–Kaufman ``P M Pᵀ = L D Lᵀ`` with ``D`` block diagonal
      of 1×1 and 2×2 blocks (:func:`torch.linalg.ldl_factor_ex`, LAPACK ``sytrf`` on
      the lower triangle). ``M`` is congruent to ``D``, so the inertia and the
      determinant of ``M`` are those of ``D``, read from the eigenvalues of its small
      blocks. Bunch–Kaufman costs ``N³/3`` flops, a thirtieth of a symmetric
      eigendecomposition, and is backward stable like the LAPACK ``sysv`` it is.
      Only the lower triangle of ``matrix`` is read.
    """

    def __init__(self, matrix: Tensor, symmetric: bool = False):
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"DenseFactorization needs a square 2-D tensor, got {got}")
        if matrix.dtype not in _FLOAT_TYPES:
            raise TypeError(f"DenseFactorization needs float32 or float64, got {matrix.dtype}")
        n = matrix.shape[0]
        if n == 0:
            raise ValueError("DenseFactorization needs a non-empty matrix, got shape (0, 0)")
        self.shape = (n, n)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.symmetric = bool(symmetric)
        scale = _finite_max_abs([matrix], "the matrix")
        tol = pivot_tolerance(n, self.dtype, scale)
        if self.symmetric:
            self._factor_ldl(matrix, tol)
        else:
            self._factor_lu(matrix, tol)

    # -- LU --------------------------------------------------------------------------------
    def _factor_lu(self, matrix: Tensor, tol: float) -> None:
        lu, piv, _ = torch.linalg.lu_factor_ex(matrix)
        u = lu.diagonal()
        _raise_if_small(u.abs(), tol, "LU pivot")
        self._lu, self._piv = lu, piv
        self._factors = LUFactors(lu, piv)
        swaps = _count_swaps(piv, [piv.shape[0]])
        self._logdet = u.abs().log().sum()
        self._sign = (-1.0) ** swaps * torch.sign(u).prod()

    # -- Bunch–Kaufman ---------------------------------------------------------------------
    def _factor_ldl(self, matrix: Tensor, tol: float) -> None:
        ld, piv, _ = torch.linalg.ldl_factor_ex(matrix)
        eig = ldl_d_eigenvalues(ld, piv)
        _raise_if_small(eig.abs(), tol, "Bunch–Kaufman pivot (eigenvalue of a block of D)")
        self._ld, self._piv = ld, piv
        self._logdet = eig.abs().log().sum()
        self._sign = torch.sign(eig).prod()
        positive = int((eig > 0).sum())
        self._inertia = Inertia(positive, eig.shape[0] - positive, 0)

    def _solve(self, rhs: Tensor) -> Tensor:
        if self.symmetric:
            return torch.linalg.ldl_solve(self._ld, self._piv, rhs)
        return self._factors.solve(rhs)


def ldl_d_eigenvalues(ld: Tensor, pivots: Tensor) -> Tensor:
    """The eigenvalues of ``D`` from a lower Bunch–Kaufman factorization (LAPACK ``sytrf``).

    LAPACK's convention (``uplo='L'``): ``pivots[k] > 0`` marks a 1×1 block ``D[k, k]``;
    a 2×2 block on rows ``k, k+1`` has ``pivots[k] = pivots[k+1] < 0`` and its
    off-diagonal entry is ``ld[k+1, k]``. Consecutive 2×2 blocks form a run of negative
    pivots that is read pairwise from its start (the values themselves may repeat, so
    they cannot be used for pairing). Returns the ``N`` eigenvalues in block order.

    Batched (``ld``: ``… × N × N``, ``pivots``: ``… × N``): the factorizations are read as
    one block diagonal ``D`` (each ends with a complete block, so the pairing of a run
    of negative pivots never crosses two of them): ``… × N`` eigenvalues in one pass.
    """
    d = ld.diagonal(dim1=-2, dim2=-1)
    e = torch.cat((ld.diagonal(-1, dim1=-2, dim2=-1), ld.new_zeros(ld.shape[:-2] + (1,))), dim=-1)
    return _d_eigenvalues(d.reshape(-1), e.reshape(-1), pivots.reshape(-1)).reshape(d.shape)


def ldl_positive_count(ld: Tensor, pivots: Tensor) -> Tensor:
    """The number of positive eigenvalues of ``D`` (so of ``A``, by Sylvester's law) from a
    lower Bunch–Kaufman factorization (LAPACK ``sytrf``), without its eigenvalues: the
    positive ``1×1`` blocks (``pivots[k] > 0``) and one per ``2×2`` block (two negative
    pivots each). A ``2×2`` block ``[[a, b], [b, c]]`` is taken only where
    ``|a|·|c| < α²b²`` (``α = (1 + √17)/8``), so ``det = ac − b² < −(1 − α²)b² < 0``: one
    eigenvalue of each sign, whatever the rounding of its computed eigenvalues.
    Batched as :func:`ldl_d_eigenvalues` (``… × N × N``, ``… × N``): ``…`` counts, no
    host synchronisation."""
    d = ld.diagonal(dim1=-2, dim2=-1)
    negative = pivots < 0
    return ((d > 0) & ~negative).sum(dim=-1) + negative.sum(dim=-1) // 2


def _d_eigenvalues(d: Tensor, e: Tensor, pivots: Tensor) -> Tensor:
    """Eigenvalues of a block diagonal ``D`` given its diagonal ``d``, sub-diagonal ``e``
    (``e[k] = D[k+1, k]``, same length as ``d``) and LAPACK pivots marking 2×2 blocks."""
    n = pivots.shape[0]
    neg = pivots < 0
    idx = torch.arange(n, device=d.device)
    prev = torch.cat((neg.new_zeros(1), neg[:-1]))
    run_start = neg & ~prev
    start_of_run = torch.cummax(torch.where(run_start, idx, torch.zeros_like(idx)), 0).values
    first = neg & ((idx - start_of_run) % 2 == 0)
    eig = d.clone()
    k = first.nonzero().squeeze(-1)
    if k.numel():
        a, c, b = d[k], d[k + 1], e[k]
        mid = (a + c) / 2
        rad = torch.hypot((a - c) / 2, b)
        # the larger root without cancellation, the smaller from the determinant
        big = mid + torch.where(mid >= 0, rad, -rad)
        det = a * c - b * b
        safe = torch.where(big != 0, big, torch.ones_like(big))
        eig[k] = big
        eig[k + 1] = torch.where(big != 0, det / safe, torch.zeros_like(big))
    return eig


# ---------------------------------------------------------------------------------------
class DiagonalFactorization(MatrixFactorization):
    """``diag(d)``: solves are divisions; ``log|det| = Σ log|d_k|``; inertia counts signs."""

    def __init__(self, diagonal: Tensor):
        if not isinstance(diagonal, Tensor) or diagonal.dim() != 1 or diagonal.shape[0] == 0:
            raise ValueError("DiagonalFactorization needs a non-empty 1-D tensor")
        n = diagonal.shape[0]
        self.shape = (n, n)
        self.dtype = diagonal.dtype
        self.device = diagonal.device
        self.symmetric = True
        scale = _finite_max_abs([diagonal], "the diagonal")
        _raise_if_small(diagonal.abs(), pivot_tolerance(n, self.dtype, scale), "diagonal entry")
        self._d = diagonal
        self._logdet = diagonal.abs().log().sum()
        self._sign = torch.sign(diagonal).prod()
        positive = int((diagonal > 0).sum())
        self._inertia = Inertia(positive, n - positive, 0)

    def _solve(self, rhs: Tensor) -> Tensor:
        return rhs / self._d.unsqueeze(-1)


# ---------------------------------------------------------------------------------------
class BlockDiagonalFactorization(MatrixFactorization):
    """``diag(M_0, …, M_{n-1})`` from a factorization of each block.

    Each block is factored on its own (so the singularity test is relative to each
    block's own size and scale); ``log|det|``, sign and inertia are sums / products.
    """

    def __init__(self, factorizations: Sequence[MatrixFactorization]):
        self.factors = tuple(factorizations)
        if not self.factors:
            raise ValueError("BlockDiagonalFactorization needs at least one block")
        sizes = [f.shape[0] for f in self.factors]
        self._sizes = sizes
        n = sum(sizes)
        self.shape = (n, n)
        self.dtype = self.factors[0].dtype
        self.device = self.factors[0].device
        self.symmetric = all(f.symmetric for f in self.factors)
        self._logdet = torch.stack([f.logdet() for f in self.factors]).sum()
        self._sign = torch.stack([f.sign() for f in self.factors]).prod()
        if self.symmetric:
            parts = [f.inertia() for f in self.factors]
            self._inertia = Inertia(*(sum(p[j] for p in parts) for j in range(3)))

    def _solve(self, rhs: Tensor) -> Tensor:
        return torch.cat([f._solve(r) for f, r in zip(self.factors, rhs.split(self._sizes))])


class BlockBidiagonalFactorization(MatrixFactorization):
    """Block forward (lower) or backward (upper) substitution.

    ``x_i = M_ii⁻¹ (r_i − M_{i,i∓1} x_{i∓1})`` with each diagonal block factored on
    its own; ``det M = ∏ det M_ii``. ``off`` are the off-diagonal blocks as objects with
    ``@`` (tensors or operators): ``off[i]`` is block ``(i+1, i)`` if ``lower`` and
    block ``(i, i+1)`` otherwise.
    """

    def __init__(self, diagonal: Sequence[MatrixFactorization], off: Sequence, *, lower: bool):
        self.factors = tuple(diagonal)
        self.off = tuple(off)
        self.lower = lower
        if len(self.off) != len(self.factors) - 1:
            raise ValueError(f"need {len(self.factors) - 1} off-diagonal blocks, got {len(self.off)}")
        self._sizes = [f.shape[0] for f in self.factors]
        n = sum(self._sizes)
        self.shape = (n, n)
        self.dtype = self.factors[0].dtype
        self.device = self.factors[0].device
        self.symmetric = False
        self._logdet = torch.stack([f.logdet() for f in self.factors]).sum()
        self._sign = torch.stack([f.sign() for f in self.factors]).prod()

    def _solve(self, rhs: Tensor) -> Tensor:
        rs = rhs.split(self._sizes)
        n = len(self.factors)
        xs: list[Tensor] = [rhs] * n
        order = range(n) if self.lower else range(n - 1, -1, -1)
        prev = None
        for i in order:
            r = rs[i]
            if prev is not None:
                coupling = self.off[i - 1] if self.lower else self.off[i]
                # shapes were validated when the operator was built: skip re-validation
                r = r - (coupling @ prev if isinstance(coupling, Tensor) else coupling._matmat(prev))
            prev = self.factors[i]._solve(r)
            xs[i] = prev
        return torch.cat(xs)


# ---------------------------------------------------------------------------------------
class BlockTridiagonalLU(MatrixFactorization):
    """Block LU with partial pivoting of a block-tridiagonal matrix (LAPACK ``gbtrf`` by blocks).

    This is Gaussian elimination with row partial pivoting, restricted to the band. At
    step ``i`` the active rows are the ``b_i`` rows left over from step ``i-1``
    (columns ``i, i+1``: blocks ``S_i, T_i``) and block row ``i+1`` (columns
    ``i, i+1, i+2``: ``L_i, D_{i+1}, U_{i+1}``). The tall panel ``[S_i; L_i]`` is
    factored with partial pivoting, ``Π_i [S_i; L_i] = [L11; L21] U11``; the
    permutation is applied to the columns to its right, which creates the one extra
    super-diagonal block of fill ``U13`` (``U13 = 0`` when no row swap crosses blocks):

        [U12 U13] = L11⁻¹ (Π_i R)_top,   [S_{i+1} T_{i+1}] = (Π_i R)_bot − L21 [U12 U13].

    Backward stable like LAPACK ``gbsv`` and independent of the diagonal blocks being
    invertible. Cost ``O(Σ b_i³)`` time and ``O(Σ b_i²)`` memory, a constant number of
    torch calls per block; each solve costs ``O(k Σ b_i²)``.
    """

    def __init__(self, diagonal: Sequence[Tensor], lower: Sequence[Tensor], upper: Sequence[Tensor]):
        n = len(diagonal)
        self._n = n
        sizes = [int(d.shape[0]) for d in diagonal]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self._sizes, self._offsets = sizes, offsets
        N = offsets[-1]
        first = diagonal[0]
        self.shape = (N, N)
        self.dtype, self.device = first.dtype, first.device
        self.symmetric = False
        panels: list[Tensor] = []
        perms: list[Tensor] = []  # Π_i as row orders: (Π_i A)[j] = A[perm[j]]
        fills: list[Tensor] = []
        norms: list[Tensor] = []
        swaps = 0
        zeros: dict[tuple[int, int], Tensor] = {}

        def zero(r: int, c: int) -> Tensor:
            if (r, c) not in zeros:
                zeros[r, c] = first.new_zeros((r, c))
            return zeros[r, c]

        # top = the b_i rows left over: [S_i, T_i, 0] over block columns i, i+1, i+2
        if n > 1:
            top = torch.cat((diagonal[0], upper[0], zero(sizes[0], sizes[2] if n > 2 else 0)), 1)
            norms.append(max_abs(top))
        else:
            top = diagonal[0]
        for i in range(n - 1):
            b0, b1 = sizes[i], sizes[i + 1]
            # block row i+1: [L_i, D_{i+1}, U_{i+1}]
            bottom = torch.cat((lower[i], diagonal[i + 1], upper[i + 1]), 1) if i + 2 < n else torch.cat((lower[i], diagonal[i + 1]), 1)
            norms.append(max_abs(bottom))
            work = torch.cat((top, bottom))
            lu, piv, _ = torch.linalg.lu_factor_ex(work[:, :b0])
            perm, swapped = _row_order(piv.tolist(), b0 + b1)
            swaps += swapped
            order = torch.tensor(perm, device=self.device)
            right = work[:, b0:].index_select(0, order)
            fill = torch.linalg.solve_triangular(lu[:b0], right[:b0], upper=False, unitriangular=True)
            schur = torch.addmm(right[b0:], lu[b0:], fill, alpha=-1)
            top = torch.cat((schur, zero(b1, sizes[i + 3])), 1) if i + 3 < n else schur
            panels.append(lu)
            perms.append(order)
            fills.append(fill)
        if n == 1:
            norms.append(max_abs(top))
        lu, piv, _ = torch.linalg.lu_factor_ex(top)
        swaps += _row_order(piv.tolist(), sizes[-1])[1]
        self._last_lu, self._last_piv = lu, piv
        self._panels, self._perms, self._fills = panels, perms, fills
        scale = torch.stack(norms).max().item()
        if not math.isfinite(scale):
            raise ValueError("the matrix contains NaN or inf; cannot factor it")
        tol = pivot_tolerance(N, self.dtype, scale)

        u = torch.cat([p[: sizes[i]].diagonal() for i, p in enumerate(panels)] + [lu.diagonal()])
        small = u.abs() <= tol
        if bool(small.any()) or not bool(torch.isfinite(u).all()):
            bad = (small | ~torch.isfinite(u)).nonzero()[0, 0].item()
            block = max(j for j in range(n) if offsets[j] <= bad)
            raise SingularMatrixError(
                f"the block-tridiagonal matrix is singular to working precision: the LU pivot "
                f"{u[bad].abs().item():.3g} in block {block} is at most the tolerance {tol:.3g} "
                f"(= {PIVOT_TOLERANCE_FACTOR}·N·eps·max|M_ij|, N = {N})",
                block=block,
            )
        self._logdet = u.abs().log().sum()
        self._sign = (-1.0) ** swaps * torch.sign(u).prod()

    def _solve(self, rhs: Tensor) -> Tensor:
        X = rhs.clone()
        sizes, off = self._sizes, self._offsets
        n = self._n
        # forward: X[block i] ← L11⁻¹ (Π r)_top; X[block i+1] ← (Π r)_bot − L21 · that
        for i in range(n - 1):
            o0, o1, o2 = off[i], off[i + 1], off[i + 2]
            lu = self._panels[i]
            b0 = sizes[i]
            r = X[o0:o2].index_select(0, self._perms[i])
            torch.linalg.solve_triangular(lu[:b0], r[:b0], upper=False, unitriangular=True, out=X[o0:o1])
            torch.addmm(r[b0:], lu[b0:], X[o0:o1], alpha=-1, out=X[o1:o2])
        o = off[n - 1]
        X[o:] = torch.linalg.lu_solve(self._last_lu, self._last_piv, X[o:])
        # backward: x_i = U11⁻¹ (y_i − [U12 U13] [x_{i+1}; x_{i+2}])
        for i in range(n - 2, -1, -1):
            o0, o1 = off[i], off[i + 1]
            o3 = off[min(i + 3, n)]
            y = torch.addmm(X[o0:o1], self._fills[i], X[o1:o3], alpha=-1)
            torch.linalg.solve_triangular(self._panels[i][: sizes[i]], y, upper=True, out=X[o0:o1])
        return X


# ---------------------------------------------------------------------------------------
class BlockTridiagonalLDL(MatrixFactorization):
    """Symmetric block LDLᵀ of a symmetric block-tridiagonal matrix, with delayed pivots.

    With diagonal blocks ``D_i`` and sub-diagonal blocks ``L_i`` (block ``(i+1, i)``),
    step ``j`` factors a *candidate pivot* ``P_j`` (``m_j × m_j``): block ``j`` of the
    current Schur complement, preceded by the ``d_j`` directions delayed by step ``j−1``.
    Only block ``j`` couples to the next block: ``C_j = [0 L_j]``.

    * **Whole pivot** (the common case). ``P = L D Lᵀ`` by Bunch–Kaufman
      (:func:`torch.linalg.ldl_factor_ex`) and ``Y = P⁻¹ C_jᵀ``; accepted when every
      multiplier is bounded, ``max|Y_ik| ≤ 1/α``. Then

          [[P, Cᵀ], [C, R]] = [[I, 0], [Yᵀ, I]] · diag(P, R − C Y) · [[I, Y], [0, I]]

      and the next candidate is ``D_{j+1} − L_j Y_last``: nothing is delayed.
    * **Split pivot** (otherwise). ``P = V Λ Vᵀ`` (:func:`torch.linalg.eigh`) and
      ``W = C_j V``, the coupling of each eigen-direction to the next block. Direction
      ``k`` is eliminated when ``|λ_k| > tol`` and ``|λ_k| ≥ α max_i |W_ik|`` —
      Bunch–Kaufman's 1×1 test, one eigen-direction at a time, so its multipliers
      ``W_ik / λ_k`` are at most ``1/α``. With ``G`` the accepted and ``B`` the delayed
      directions, the change of variables ``V`` and the elimination of ``G`` leave

          P_{j+1} = [[Λ_B, W_Bᵀ], [W_B, D_{j+1} − W_G Λ_G⁻¹ W_Gᵀ]].

    Every step is a congruence (orthogonal or unit triangular), so by Sylvester's law the
    inertia of the matrix, and ``|det|``, are those of the accepted eigenvalues and of
    the Bunch–Kaufman ``D`` blocks. The couplings ``L_j`` are never updated and the
    delayed ``|λ|`` are below ``α max|W|``, so the candidates stay within a fixed
    multiple of ``σ = max|M_ij|`` whatever the history, and the multipliers are bounded
    by ``1/α`` (``α = DEFAULT_ALPHA = 1/4``): the conditions for a backward-stable LDLᵀ.
    The last candidate is a whole pivot. If the test would delay more directions than
    the largest block has rows (graded matrices, whose scale grows along the chain, would
    otherwise carry their small directions on and on), it is relaxed for that step to
    ``|λ_k| ≥ α max_i |W_ik| · min(1, max_i |W_ik| / σ)``, which still bounds the entries
    ``|W_ik|² / |λ_k|`` of ``|L||D||Lᵀ|`` by ``σ/α`` — what normwise backward stability
    needs. After a failed whole-pivot test, the next ``1, 2, 4, …, 64`` steps go
    straight to the split pivot, so matrices that mostly need it do not pay twice.

    **Singularity.** A direction with ``|λ| ≤ tol`` that the coupling does not see
    (``max_i |W_ik| ≤ tol``) is a null vector of the matrix, and so is a Bunch–Kaufman
    eigenvalue ``≤ tol``: either raises :class:`SingularMatrixError` with ``block = j``.

    **Cost.** A whole pivot costs one Bunch–Kaufman factorization, one solve with
    ``b_{j+1}`` right-hand sides and one product; a split pivot one ``eigh`` and a few
    products. With ``m_j`` of the order of ``b_j``: time ``O(Σ b_i³)``, memory
    ``O(Σ b_i²)``, ``O(k Σ b_i²)`` per solve with ``k`` right-hand sides, a constant
    number of torch calls per block. Only the lower triangles of the diagonal blocks are
    read. ``pivot_sizes[j] = m_j``; ``delayed[j] = d_{j+1}`` (directions passed from
    block ``j`` to block ``j+1``).
    """

    def __init__(self, diagonal: Sequence[Tensor], lower: Sequence[Tensor], *, alpha: float = DEFAULT_ALPHA):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        n = len(diagonal)
        sizes = [int(d.shape[0]) for d in diagonal]
        offsets = _offsets_of(sizes)
        N = offsets[-1]
        self._sizes = sizes
        first = diagonal[0]
        self.shape = (N, N)
        self.dtype, self.device = first.dtype, first.device
        self.symmetric = True
        scale = _finite_max_abs([*diagonal, *lower], "the matrix")
        tol = pivot_tolerance(N, self.dtype, scale)
        bound, cap = 1.0 / alpha, max(sizes)

        # per step, for the solve: forward ("whole", LD, pivots, Yᵀ) or ("split", A, W_G,
        # [|G|, |B|]) with A = [Λ_G⁻¹ V_Gᵀ; V_Bᵀ]; backward (d, None, Y) or (d, V, V_G Λ_G⁻¹ W_Gᵀ)
        self._forward: list[tuple] = []
        self._backward: list[tuple] = []
        self.pivot_sizes: list[int] = []
        self.delayed: list[int] = []
        split_lam: list[Tensor] = []  # accepted eigenvalues of split pivots, all > tol
        bk_d: list[Tensor] = []  # diagonals, padded sub-diagonals and pivots of the BK D's
        bk_e: list[Tensor] = []
        bk_piv: list[Tensor] = []
        bk_block: list[int] = []
        zero = first.new_zeros(1)
        skip, wait = 0, 1  # back-off of the whole-pivot attempts after failures
        P, d = diagonal[0], 0
        for j in range(n):
            m = P.shape[0]
            self.pivot_sizes.append(m)
            last = j == n - 1
            if last or skip == 0:
                ld, piv, _ = torch.linalg.ldl_factor_ex(P)
                Y = None
                if not last:
                    Ct = lower[j].mT if d == 0 else torch.cat((first.new_zeros(d, sizes[j + 1]), lower[j].mT))
                    Y = torch.linalg.ldl_solve(ld, piv, Ct)
                if last or max_abs(Y).item() <= bound:  # False for NaN
                    self._forward.append(("whole", ld, piv, None if last else Y.mT))
                    self._backward.append((d, None, Y))
                    bk_d.append(ld.diagonal())
                    bk_e.extend((ld.diagonal(-1), zero))
                    bk_piv.append(piv)
                    bk_block.append(j)
                    if not last:
                        self.delayed.append(0)
                        P, d, wait = torch.addmm(diagonal[j + 1], lower[j], Y[d:], alpha=-1), 0, 1
                    continue
                skip, wait = wait, min(2 * wait, 64)
            else:
                skip -= 1
            # split pivot: accept the eigen-directions that pass the 1×1 test, delay the rest
            lam, V = torch.linalg.eigh(P)
            W = lower[j] @ V[d:]
            wmax = W.abs().amax(0)
            absl = lam.abs()
            threshold = alpha * wmax
            good = absl > threshold.clamp(min=tol)
            g = int(good.count_nonzero())
            if m - g > cap:  # relaxed test: |W_k|²/|λ_k| ≤ max|M_ij|/α
                good = absl > (threshold * (wmax / scale).clamp_(max=1.0)).clamp_(min=tol)
                g = int(good.count_nonzero())
            if g < m:
                dead = torch.maximum(absl, wmax) <= tol  # |λ| ≤ tol and unseen by the coupling
                if bool(dead.any()):
                    raise _singular_pivot(j, n, lam[dead], tol, N, decoupled=True)
                # reorder the directions: accepted (G) first, each group in eigenvalue order
                b1 = W.shape[0]
                T = torch.cat((lam.unsqueeze(0), W, V)).index_select(1, torch.argsort(~good, stable=True))
                lam, W, V = T[0], T[1 : 1 + b1], T[1 + b1 :]
            recip = lam.reciprocal()
            recip[g:] = 1.0
            inv, WG = recip[:g], W[:, :g]
            MG = WG * inv  # the multipliers, |M_ik| ≤ 1/α
            S = torch.addmm(diagonal[j + 1], MG, WG.mT, alpha=-1)
            self._forward.append(("split", (V * recip).mT, WG, [g, m - g]))
            self._backward.append((d, V, V[:, :g] @ MG.mT))
            split_lam.append(lam[:g])
            self.delayed.append(m - g)
            if g < m:
                WB = W[:, g:]
                S = torch.cat((torch.cat((torch.diag(lam[g:]), WB.mT), 1), torch.cat((WB, S), 1)))
            P, d = S, m - g

        dd = torch.cat(bk_d)  # the last pivot is always a whole one
        lam = _d_eigenvalues(dd, torch.cat(bk_e)[: dd.shape[0]], torch.cat(bk_piv))
        small = lam.abs() <= tol
        if bool(small.any()):
            row = int(small.nonzero()[0, 0])
            starts = _offsets_of([t.shape[0] for t in bk_d])
            k = max(i for i, start in enumerate(starts[:-1]) if start <= row)
            raise _singular_pivot(bk_block[k], n, lam[row : row + 1], tol, N, decoupled=bk_block[k] < n - 1)
        lam = torch.cat([*split_lam, lam])
        self._logdet = lam.abs().log().sum()
        self._sign = torch.sign(lam).prod()
        positive = int((lam > 0).sum())
        self._inertia = Inertia(positive, N - positive, 0)

    def _solve(self, rhs: Tensor) -> Tensor:
        X = rhs.clone()
        xs = [*X.split(self._sizes), X[X.shape[0] :]]  # block views, and an empty "block n"
        # forward: r = [delayed part t; block j]; keep c (the accepted part, scaled),
        # update the next block, pass the delayed part t on
        cs: list[Tensor] = []
        t = None
        for j, (kind, a, b, c) in enumerate(self._forward):
            r = xs[j] if t is None else torch.cat((t, xs[j]))
            if kind == "whole":  # a, b = LD, pivots; c = Yᵀ = C P⁻¹
                if c is not None:
                    xs[j + 1].addmm_(c, r, alpha=-1)
                cs.append(torch.linalg.ldl_solve(a, b, r))
                t = None
            else:  # a = A, b = W_G, c = [|G|, |B|]
                cG, t = torch.mm(a, r).split(c)  # Λ_G⁻¹ V_Gᵀ r, V_Bᵀ r
                xs[j + 1].addmm_(b, cG, alpha=-1)
                cs.append(cG)
                if t.shape[0] == 0:
                    t = None
        # backward: z_j = c_j − Y_j x_{j+1} (with c_j ← V [c_j; u] for a split pivot);
        # x_j = z_j[d:], and u = z_j[:d] is the part delayed by step j − 1
        u = None
        for j in range(len(self._backward) - 1, -1, -1):
            d, V, Y = self._backward[j]
            c = cs[j]
            if V is not None:
                c = torch.mm(V, c if u is None else torch.cat((c, u)))
            if d == 0:
                if Y is None:
                    xs[j].copy_(c)
                else:
                    torch.addmm(c, Y, xs[j + 1], alpha=-1, out=xs[j])
                u = None
            else:
                z = c if Y is None else torch.addmm(c, Y, xs[j + 1], alpha=-1)
                u, x = z.split((d, z.shape[0] - d))
                xs[j].copy_(x)
        return X


def _singular_pivot(block: int, n: int, lam: Tensor, tol: float, N: int, decoupled: bool = False) -> SingularMatrixError:
    smallest = lam.abs().min().item()
    why = "no later block couples to it" if decoupled else "it is in the last block"
    return SingularMatrixError(
        f"the symmetric block-tridiagonal matrix is singular to working precision: the pivot "
        f"at block {block} (of {n}) has an eigenvalue of modulus {smallest:.3g} ≤ the "
        f"tolerance {tol:.3g} (= {PIVOT_TOLERANCE_FACTOR}·N·eps·max|M_ij|, N = {N}), and {why}",
        block=block,
    )


# ---------------------------------------------------------------------------------------
def _offsets_of(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _row_order(pivots: list[int], m: int) -> tuple[list[int], int]:
    """The row order of LAPACK's sequential interchanges (row ``k`` ↔ row ``pivots[k] − 1``)
    on ``m`` rows, and how many of them actually swap. ``(Π A)[j] = A[order[j]]``."""
    order = list(range(m))
    swaps = 0
    for k, p in enumerate(pivots):
        p -= 1
        if p != k:
            order[k], order[p] = order[p], order[k]
            swaps += 1
    return order, swaps


def _count_swaps(pivots: Tensor, sizes: Sequence[int]) -> int:
    """Row interchanges in LAPACK pivots (1-based, local to blocks of ``sizes`` rows)."""
    device = pivots.device
    counts = torch.tensor(sizes, device=device)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(pivots.shape[0], device=device) - torch.repeat_interleave(starts, counts) + 1
    return int((pivots != local).sum())


def _finite_max_abs(tensors: Sequence[Tensor], what: str) -> float:
    """``max |entry|`` over all tensors (small blocks of equal shape are reduced together);
    NaN or inf is an error."""
    batches = same_shape_batches([tuple(t.shape) for t in tensors])
    if not batches:
        return 0.0
    norms = [
        max_abs(tensors[run[0]] if len(run) == 1 else torch.stack([tensors[i] for i in run]))
        for run in batches
    ]
    scale = (norms[0] if len(norms) == 1 else torch.stack(norms).max()).item()
    if not math.isfinite(scale):
        raise ValueError(f"{what} contains NaN or inf; cannot factor it")
    return scale


def _raise_if_small(pivots: Tensor, tol: float, what: str) -> None:
    small = pivots <= tol
    if bool(small.any()):
        k = int(small.nonzero()[0, 0])
        raise SingularMatrixError(
            f"the matrix is singular to working precision: {what} {k} has modulus "
            f"{pivots[k].item():.3g} ≤ the tolerance {tol:.3g} "
            f"(= {PIVOT_TOLERANCE_FACTOR}·N·eps·max|M_ij|, N = {pivots.shape[0]})"
        )


def _check_solve_rhs(f: MatrixFactorization, rhs: Tensor) -> Tensor:
    name = type(f).__name__
    if not isinstance(rhs, Tensor):
        raise TypeError(f"{name}.solve needs a torch.Tensor, got {type(rhs).__name__}")
    n = f.shape[0]
    if rhs.dim() not in (1, 2) or rhs.shape[0] != n:
        raise ValueError(f"{name} of shape {f.shape} needs a right-hand side of shape ({n},) or ({n}, k), got {tuple(rhs.shape)}")
    if rhs.dtype != f.dtype:
        raise TypeError(f"{name} has dtype {f.dtype}, the right-hand side has dtype {rhs.dtype}")
    if rhs.device != f.device:
        raise ValueError(f"{name} is on {f.device}, the right-hand side is on {rhs.device}")
    if not bool(torch.isfinite(rhs).all()):
        raise ValueError(f"the right-hand side given to {name}.solve contains NaN or inf")
    return rhs


#: The name this class had before it was told apart from :class:`tallskinny.Factorization`
#: (kept: ``tallskinny.linalg.Factorization`` is public).
Factorization = MatrixFactorization


__all__ = [
    "DEFAULT_ALPHA",
    "PIVOT_TOLERANCE_FACTOR",
    "BlockBidiagonalFactorization",
    "BlockDiagonalFactorization",
    "BlockTridiagonalLDL",
    "BlockTridiagonalLU",
    "DenseFactorization",
    "DiagonalFactorization",
    "Factorization",
    "MatrixFactorization",
    "ldl_d_eigenvalues",
    "ldl_positive_count",
    "pivot_tolerance",
]
