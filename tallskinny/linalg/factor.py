"""Factorizations: factor once, solve many, and read off ``log|det|``, sign and inertia.

Every factorization of an ``N × N`` matrix ``M`` offers

* ``solve(rhs)`` — ``M⁻¹ rhs`` for ``rhs`` of shape ``(N,)`` or ``(N, k)``;
* ``logdet()`` — ``log|det M|`` as a 0-dim tensor, and ``sign()`` — ``sign(det M)`` (±1);
* ``inertia()`` — for a symmetric ``M``, the counts of positive, negative and zero
  eigenvalues (Sylvester's law of inertia applied to the factorization); a
  non-symmetric factorization raises :class:`TypeError`.

**Singularity.** A matrix is *singular to working precision* when a pivot (a diagonal
entry of ``U`` in LU, or the smallest eigenvalue modulus of a pivot block in the
symmetric factorizations) is at most ``PIVOT_TOLERANCE_FACTOR · N · eps · scale``,
where ``eps`` is the machine epsilon of the dtype and ``scale`` is the largest absolute
entry of the matrix. The factor ``c = PIVOT_TOLERANCE_FACTOR = 1`` makes the test flag
exactly the matrices whose pivots are at the size of the rounding errors of an
elimination on ``N`` unknowns (``N · eps · scale`` bounds those errors up to growth, and
partial pivoting keeps growth small in practice). Such a matrix raises
:class:`SingularMatrixError` when it is factored, before any solve — never NaN or inf.
Consequently a successful factorization always reports ``inertia().zero == 0``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .errors import SingularMatrixError
from .operators import Inertia

PIVOT_TOLERANCE_FACTOR = 1.0
"""``c`` in the singularity test ``pivot ≤ c · N · eps · max|M_ij|``."""

DEFAULT_ALPHA = 0.1
"""Block Bunch–Kaufman parameter of :class:`BlockTridiagonalLDL`: a pivot block is
accepted when its multiplier ``‖L_i S_i⁻¹‖₂ ≤ 1/α``."""

DEFAULT_MAX_PIVOT_BLOCKS = 4
"""How many blocks :class:`BlockTridiagonalLDL` merges, at most, while looking for a
pivot that passes the multiplier test (singular candidates are merged further)."""

_FLOAT_TYPES = (torch.float32, torch.float64)


def pivot_tolerance(n: int, dtype: torch.dtype, scale: float) -> float:
    """``c · n · eps · scale``: pivots at or below it count as zero (see the module doc)."""
    return PIVOT_TOLERANCE_FACTOR * n * torch.finfo(dtype).eps * scale


# ---------------------------------------------------------------------------------------
class Factorization:
    """Base class of all factorizations of a square matrix.

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
class DenseFactorization(Factorization):
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
        scale = _max_abs([matrix], "the matrix")
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
        return torch.linalg.lu_solve(self._lu, self._piv, rhs)


def ldl_d_eigenvalues(ld: Tensor, pivots: Tensor) -> Tensor:
    """The eigenvalues of ``D`` from a lower Bunch–Kaufman factorization (LAPACK ``sytrf``).

    LAPACK's convention (``uplo='L'``): ``pivots[k] > 0`` marks a 1×1 block ``D[k, k]``;
    a 2×2 block on rows ``k, k+1`` has ``pivots[k] = pivots[k+1] < 0`` and its
    off-diagonal entry is ``ld[k+1, k]``. Consecutive 2×2 blocks form a run of negative
    pivots that is read pairwise from its start (the values themselves may repeat, so
    they cannot be used for pairing). Returns the ``N`` eigenvalues in block order.
    """
    e = torch.cat((ld.diagonal(-1), ld.new_zeros(1)))
    return _d_eigenvalues(ld.diagonal(), e, pivots)


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
class DiagonalFactorization(Factorization):
    """``diag(d)``: solves are divisions; ``log|det| = Σ log|d_k|``; inertia counts signs."""

    def __init__(self, diagonal: Tensor):
        if not isinstance(diagonal, Tensor) or diagonal.dim() != 1 or diagonal.shape[0] == 0:
            raise ValueError("DiagonalFactorization needs a non-empty 1-D tensor")
        n = diagonal.shape[0]
        self.shape = (n, n)
        self.dtype = diagonal.dtype
        self.device = diagonal.device
        self.symmetric = True
        scale = _max_abs([diagonal], "the diagonal")
        _raise_if_small(diagonal.abs(), pivot_tolerance(n, self.dtype, scale), "diagonal entry")
        self._d = diagonal
        self._logdet = diagonal.abs().log().sum()
        self._sign = torch.sign(diagonal).prod()
        positive = int((diagonal > 0).sum())
        self._inertia = Inertia(positive, n - positive, 0)

    def _solve(self, rhs: Tensor) -> Tensor:
        return rhs / self._d.unsqueeze(-1)


# ---------------------------------------------------------------------------------------
class BlockDiagonalFactorization(Factorization):
    """``diag(M_0, …, M_{n-1})`` from a factorization of each block.

    Each block is factored on its own (so the singularity test is relative to each
    block's own size and scale); ``log|det|``, sign and inertia are sums / products.
    """

    def __init__(self, factorizations: Sequence[Factorization]):
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


class BlockBidiagonalFactorization(Factorization):
    """Block forward (lower) or backward (upper) substitution.

    ``x_i = M_ii⁻¹ (r_i − M_{i,i∓1} x_{i∓1})`` with each diagonal block factored on
    its own; ``det M = ∏ det M_ii``. ``off`` are the off-diagonal blocks as objects with
    ``@`` (tensors or operators): ``off[i]`` is block ``(i+1, i)`` if ``lower`` and
    block ``(i, i+1)`` otherwise.
    """

    def __init__(self, diagonal: Sequence[Factorization], off: Sequence, *, lower: bool):
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
                r = r - coupling @ prev
            prev = self.factors[i]._solve(r)
            xs[i] = prev
        return torch.cat(xs)


# ---------------------------------------------------------------------------------------
class BlockTridiagonalLU(Factorization):
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
        scale = _max_abs([*diagonal, *lower, *upper], "the matrix")
        tol = pivot_tolerance(N, self.dtype, scale)

        panels: list[Tensor] = []
        perms: list[Tensor] = []  # Πᵢᵀ as (transposed views of) permutation matrices
        fills: list[Tensor] = []
        pivs: list[Tensor] = []
        S = diagonal[0]
        T = upper[0] if n > 1 else None
        for i in range(n - 1):
            b0 = sizes[i]
            panel = torch.cat((S, lower[i]))
            lu, piv, _ = torch.linalg.lu_factor_ex(panel)
            Pt = torch.lu_unpack(lu, piv, unpack_data=False)[0].mT
            # Π R with R = [[T, 0], [D_{i+1}, U_{i+1}]]
            right = Pt @ torch.cat((T, diagonal[i + 1]))
            if i + 2 < n:
                right = torch.cat((right, Pt[:, b0:] @ upper[i + 1]), 1)
            fill = torch.linalg.solve_triangular(lu[:b0], right[:b0], upper=False, unitriangular=True)
            schur = torch.addmm(right[b0:], lu[b0:], fill, alpha=-1)
            b1 = sizes[i + 1]
            S, T = schur[:, :b1], schur[:, b1:]
            panels.append(lu)
            perms.append(Pt)
            fills.append(fill)
            pivs.append(piv)
        lu, piv, _ = torch.linalg.lu_factor_ex(S)
        self._last_lu, self._last_piv = lu, piv
        pivs.append(piv)
        self._panels, self._perms, self._fills = panels, perms, fills

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
        swaps = _count_swaps(torch.cat(pivs), sizes)
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
            r = self._perms[i] @ X[o0:o2]
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
class BlockTridiagonalLDL(Factorization):
    """Symmetric block LDLᵀ with block pivoting of a symmetric block-tridiagonal matrix.

    With diagonal blocks ``D_i`` and sub-diagonal blocks ``L_i`` (block ``(i+1, i)``),
    the elimination takes pivots ``P_k`` that are runs of consecutive blocks ``s..e`` of
    the current Schur complement. With the coupling ``C = [0 … 0 L_e]`` of ``P`` to the
    next block and ``Y = P⁻¹ Cᵀ``,

        [[P, Cᵀ], [C, R]] = [[I, 0], [Yᵀ, I]] · diag(P, R − C Y) · [[I, Y], [0, I]],

    so the next Schur complement is ``S_{e+1} = D_{e+1} − L_e Y_last`` and the multiplier
    is ``M = Yᵀ``. The matrix is congruent to ``diag(P_k)``: by Sylvester's law its
    inertia and ``|det|`` are those of the pivots.

    **Pivoting (a block analogue of Bunch–Kaufman).** A candidate pivot is accepted
    when it is nonsingular and its multiplier is bounded, ``‖M‖₂ ≤ 1/α``
    (``α = DEFAULT_ALPHA = 1/10``; ``‖M‖_F`` is tried first as a cheap upper bound).
    Then ``‖S_{e+1}‖ ≤ ‖D_{e+1}‖ + ‖L_e‖/α``: the Schur complements never grow beyond
    ``(1 + 1/α)`` times the largest block of the matrix, whatever the history (the
    coupling blocks are never updated), and the multipliers are bounded by ``1/α`` —
    the conditions for a backward-stable block LDLᵀ. The common case costs one
    Bunch–Kaufman factorization (:func:`torch.linalg.ldl_factor_ex`) of the block
    ``S_i``, whose ``D`` gives its inertia and determinant. When that pivot fails the
    test, the rank-revealing path takes over: candidates are factored by
    :func:`torch.linalg.eigh`; a rejected candidate is merged with the next block (a
    larger pivot) and retried; after ``max_pivot_blocks`` blocks the nonsingular
    candidate with the smallest multiplier is taken. Singular candidates are merged
    until they are not; a null vector that the coupling does not see (``|λ|`` and
    ``‖C v‖`` both at most the tolerance) proves the matrix singular and stops at once.
    A matrix whose last pivot is singular raises :class:`SingularMatrixError` with
    ``block`` the first block of that pivot.

    **Cost.** Without merging: per block one Bunch–Kaufman factorization, one solve with
    ``b_{i+1}`` right-hand sides and one product, ``O(Σ b_i³)`` time (about as much as
    block LU), ``O(Σ b_i²)`` memory, ``O(k Σ b_i²)`` per solve with ``k`` right-hand
    sides. Each rejected pivot adds eigendecompositions of the candidates (``O(m³)`` for
    ``m`` rows, about ten times a Bunch–Kaufman). Only the lower triangles of the
    diagonal blocks are read. ``pivot_blocks`` lists the blocks ``(s, e)`` of each pivot.
    """

    def __init__(
        self,
        diagonal: Sequence[Tensor],
        lower: Sequence[Tensor],
        *,
        alpha: float = DEFAULT_ALPHA,
        max_pivot_blocks: int = DEFAULT_MAX_PIVOT_BLOCKS,
    ):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if max_pivot_blocks < 1:
            raise ValueError(f"max_pivot_blocks must be at least 1, got {max_pivot_blocks}")
        n = len(diagonal)
        sizes = [int(d.shape[0]) for d in diagonal]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self._sizes, self._offsets = sizes, offsets
        N = offsets[-1]
        first = diagonal[0]
        self.shape = (N, N)
        self.dtype, self.device = first.dtype, first.device
        self.symmetric = True
        scale = _max_abs([*diagonal, *lower], "the matrix")
        tol = pivot_tolerance(N, self.dtype, scale)
        self._tol, self._bound, self._max_blocks = tol, 1.0 / alpha, max_pivot_blocks
        self._diagonal, self._lower = diagonal, lower

        # each pivot: (row start, row stop, solver, Y = P⁻¹Cᵀ or None); solver is
        # ("bk", LD, pivots) or ("eig", V, 1/λ)
        self._pivots: list[tuple[int, int, tuple, Tensor | None]] = []
        self.pivot_blocks: list[tuple[int, int]] = []
        eigenvalues: list[Tensor] = []  # of the eigen pivots, all verified nonzero
        bk_d: list[Tensor] = []  # diagonals, padded sub-diagonals and pivots of D
        bk_e: list[Tensor] = []
        bk_piv: list[Tensor] = []
        bk_first: list[int] = []  # first block of each BK pivot, per row
        zero = first.new_zeros(1)
        i = 0
        S = diagonal[0]
        while i < n:
            ld, piv, _ = torch.linalg.ldl_factor_ex(S)
            Y = None
            accepted = i == n - 1
            if not accepted:
                Y = torch.linalg.ldl_solve(ld, piv, lower[i].mT)
                accepted = self._multiplier_ok(Y)
            if accepted:
                self._pivots.append((offsets[i], offsets[i + 1], ("bk", ld, piv), Y))
                self.pivot_blocks.append((i, i))
                bk_d.append(ld.diagonal())
                bk_e.extend((ld.diagonal(-1), zero))
                bk_piv.append(piv)
                bk_first.append(i)
                e = i
            else:
                e, lam, V, Y = self._eigen_pivot(i, S)
                self._pivots.append((offsets[i], offsets[e + 1], ("eig", V, 1.0 / lam), Y))
                self.pivot_blocks.append((i, e))
                eigenvalues.append(lam)
            if e < n - 1:
                b = sizes[e]
                S = torch.addmm(diagonal[e + 1], lower[e], Y[-b:], alpha=-1)
            i = e + 1

        parts = list(eigenvalues)
        if bk_d:
            d = torch.cat(bk_d)
            lam = _d_eigenvalues(d, torch.cat(bk_e)[: d.shape[0]], torch.cat(bk_piv))
            small = lam.abs() <= tol
            if bool(small.any()):
                row = int(small.nonzero()[0, 0])
                bk_sizes = [sizes[j] for j in bk_first]
                k = max(j for j, start in enumerate(_offsets_of(bk_sizes)[:-1]) if start <= row)
                raise _singular_pivot(bk_first[k], n, lam[row : row + 1], tol, N, decoupled=True)
            parts.append(lam)
        lam = torch.cat(parts)
        self._logdet = lam.abs().log().sum()
        self._sign = torch.sign(lam).prod()
        positive = int((lam > 0).sum())
        self._inertia = Inertia(positive, N - positive, 0)
        del self._diagonal, self._lower

    def _multiplier_ok(self, Y: Tensor) -> bool:
        """``‖Y‖₂ ≤ 1/α`` (Frobenius first); False for NaN or inf."""
        norm = torch.linalg.matrix_norm(Y).item()
        if norm <= self._bound:
            return True
        if not math.isfinite(norm):
            return False
        return torch.linalg.matrix_norm(Y, ord=2).item() <= self._bound

    def _eigen_pivot(self, i: int, S: Tensor) -> tuple[int, Tensor, Tensor, Tensor | None]:
        """The rank-revealing search for a pivot starting at block ``i`` with Schur block ``S``.

        Returns ``(e, λ, V, Y)``: the pivot spans blocks ``i..e`` and is ``V diag(λ) Vᵀ``.
        """
        diagonal, lower, sizes = self._diagonal, self._lower, self._sizes
        n, tol = len(sizes), self._tol
        P, j = S, i
        candidates: list[tuple[float, int, Tensor, Tensor, Tensor]] = []
        while True:
            lam, V = torch.linalg.eigh(P)
            absl = lam.abs()
            if j == n - 1:
                if absl.min().item() <= tol:
                    raise _singular_pivot(i, n, lam, tol, self.shape[0])
                return j, lam, V, None
            W = lower[j] @ V[-sizes[j] :]  # C V
            if absl.min().item() > tol:
                Mhat = W / lam  # M = Mhat Vᵀ
                norm = torch.linalg.matrix_norm(Mhat).item()
                if norm > self._bound:
                    norm = torch.linalg.matrix_norm(Mhat, ord=2).item()
                if norm <= self._bound:
                    return j, lam, V, V @ Mhat.mT
                candidates.append((norm, j, lam, V, Mhat))
            else:
                # a null vector of P unseen by the coupling is a null vector of the matrix
                residual = torch.sqrt(absl.square() + W.square().sum(0))
                if residual.min().item() <= tol:
                    raise _singular_pivot(i, n, lam, tol, self.shape[0], decoupled=True)
            if candidates and j - i + 1 >= self._max_blocks:
                _, j, lam, V, Mhat = min(candidates, key=lambda c: c[0])
                return j, lam, V, V @ Mhat.mT
            P = _merge(P, lower[j], diagonal[j + 1], sizes[j])
            j += 1

    def _solve(self, rhs: Tensor) -> Tensor:
        X = rhs.clone()
        pivots = self._pivots
        # forward: next block −= Yᵀ z_k, then z_k ← P_k⁻¹ z_k
        for o_s, o_e, solver, Y in pivots:
            z = X[o_s:o_e]
            if Y is not None:
                X[o_e : o_e + Y.shape[1]].addmm_(Y.mT, z, alpha=-1)
            kind, a, b = solver
            if kind == "bk":
                z.copy_(torch.linalg.ldl_solve(a, b, z))
            else:
                z.copy_(a @ (b.unsqueeze(-1) * (a.mT @ z)))
        # backward: x_k = w_k − Y x_next
        for o_s, o_e, _, Y in reversed(pivots):
            if Y is not None:
                X[o_s:o_e].addmm_(Y, X[o_e : o_e + Y.shape[1]], alpha=-1)
        return X


def _merge(P: Tensor, coupling: Tensor, next_diagonal: Tensor, last: int) -> Tensor:
    """``[[P, Cᵀ], [C, D]]`` with ``C = [0 … 0 coupling]`` (``coupling`` meets P's last ``last`` rows)."""
    m, b = P.shape[0], next_diagonal.shape[0]
    out = P.new_zeros((m + b, m + b))
    out[:m, :m] = P
    out[m:, m - last : m] = coupling
    out[m - last : m, m:] = coupling.mT
    out[m:, m:] = next_diagonal
    return out


def _singular_pivot(block: int, n: int, lam: Tensor, tol: float, N: int, decoupled: bool = False) -> SingularMatrixError:
    smallest = lam.abs().min().item()
    why = (
        "it has a null vector that no later block couples to"
        if decoupled
        else "no later block is left to merge it with"
    )
    return SingularMatrixError(
        f"the symmetric block-tridiagonal matrix is singular to working precision: the pivot "
        f"starting at block {block} (of {n}) has an eigenvalue of modulus {smallest:.3g} ≤ the "
        f"tolerance {tol:.3g} (= {PIVOT_TOLERANCE_FACTOR}·N·eps·max|M_ij|, N = {N}), and {why}",
        block=block,
    )


# ---------------------------------------------------------------------------------------
def _offsets_of(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _count_swaps(pivots: Tensor, sizes: Sequence[int]) -> int:
    """Row interchanges in LAPACK pivots (1-based, local to blocks of ``sizes`` rows)."""
    device = pivots.device
    counts = torch.tensor(sizes, device=device)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(pivots.shape[0], device=device) - torch.repeat_interleave(starts, counts) + 1
    return int((pivots != local).sum())


def _max_abs(tensors: Sequence[Tensor], what: str) -> float:
    """``max |entry|`` over all tensors; NaN or inf is an error."""
    if len(tensors) == 1:
        scale = torch.linalg.vector_norm(tensors[0], float("inf")).item() if tensors[0].numel() else 0.0
    else:
        norms = [torch.linalg.vector_norm(t, float("inf")) for t in tensors if t.numel()]
        scale = torch.stack(norms).max().item() if norms else 0.0
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


def _check_solve_rhs(f: Factorization, rhs: Tensor) -> Tensor:
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


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MAX_PIVOT_BLOCKS",
    "PIVOT_TOLERANCE_FACTOR",
    "BlockBidiagonalFactorization",
    "BlockDiagonalFactorization",
    "BlockTridiagonalLDL",
    "BlockTridiagonalLU",
    "DenseFactorization",
    "DiagonalFactorization",
    "Factorization",
    "ldl_d_eigenvalues",
    "pivot_tolerance",
]
