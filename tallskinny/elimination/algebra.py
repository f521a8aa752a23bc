"""Dense algebra shared by the elimination's stages (:mod:`tallskinny.elimination.stages`):
symmetric congruences ``FᵀSF`` with structured ``F``, the stage pivot factorization
``SymmetricFactor`` of ``Q_θθ``, and ``StageSingular``, raised where a stage cannot be
eliminated."""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from ..errors import SingularSystemError
from ..linalg import Diagonal, Inertia, LinearOperator, ScaledIdentity, Zero, pivot_tolerance
from ..linalg.factor import ldl_positive_count
from ..linalg.kronecker import identity_kronecker_factor
from ..linalg.ldl import explicit_ldl
from ..linalg.lu import LUFactors, in_layout_of
from ..linalg.norms import max_abs
from . import workspace


class StageSingular(Exception):
    def __init__(self, stage: int):
        self.stage = stage


def symmetrize(S: Tensor) -> Tensor:
    """``(S + Sᵀ)/2`` (one new tensor: the halving is in place)."""
    return torch.add(S, S.mT).mul_(0.5)


def subtract_symmetric_product(S: Tensor, Q: Tensor, K: Tensor) -> Tensor:
    """``S − QᵀK`` symmetrised as ``(M + Mᵀ)/2``, for a symmetric ``QᵀK`` (``K = P⁻¹Q``
    with ``P`` symmetric: a Schur complement, or the operands ``(L⁻¹Q, D⁻¹L⁻¹Q)`` of a
    symmetric factorization); ``S`` is overwritten (and, when large, given back to the
    workspace pool).

    Averaging matters: ``K`` carries errors of ``eps·cond(P)``, whose antisymmetric part
    the mean removes (mirroring the lower triangle instead does not)."""
    return symmetrized(S.addmm_(Q.mT, K, alpha=-1.0))


HALF_SOLVE_MIN_ORDER = 384
"""Order from which :meth:`SymmetricFactor.of` with ``half=True`` forms Schur complements
by one triangular solve (Bunch–Kaufman ``LDLᵀ`` for an indefinite matrix): below it LU
and ``K = Q⁻¹B`` cost less (their fixed costs are smaller: CHANGELOG)."""

SPLIT_SCHUR_MIN = 256
"""Order from which :func:`subtract_schur` forms a product symmetric by construction by
its upper blocks only."""


def subtract_schur(S: Tensor, X: Tensor, Y: Tensor, symmetric: bool) -> Tensor:
    """``S − XᵀY`` symmetrised, for the operands of
    :meth:`SymmetricFactor.schur_operands`. Where ``XᵀY`` is symmetric by construction
    (``symmetric``; ``Y = D⁻¹X``) and of order ``≥ SPLIT_SCHUR_MIN``, its two diagonal
    blocks and the block above them are formed (¾ of the product) and that block is
    mirrored; else :func:`subtract_symmetric_product`."""
    n = S.shape[0]
    if not symmetric or n < SPLIT_SCHUR_MIN:
        return subtract_symmetric_product(S, X, Y)
    h = n // 2
    S[:h, h:].add_(S[h:, :h].mT).mul_(0.5)  # (S's own rounding asymmetry: averaged, as below)
    S[:h, :h].addmm_(X[:, :h].mT, Y[:, :h], alpha=-1.0)
    S[h:, h:].addmm_(X[:, h:].mT, Y[:, h:], alpha=-1.0)
    S[:h, h:].addmm_(X[:, :h].mT, Y[:, h:], alpha=-1.0)
    S[h:, :h] = S[:h, h:].mT
    return symmetrized(S)


def symmetrized(S: Tensor) -> Tensor:
    """``(S + Sᵀ)/2`` (``S`` is the caller's own: a large one goes back to the workspace
    pool, and the result takes a buffer from it)."""
    out = torch.add(S, S.mT, out=workspace.empty(S.shape, S)).mul_(0.5)
    workspace.give(S)
    return out


def congruence(F: LinearOperator, S: Tensor) -> Tensor:
    """``Fᵀ S F`` for a symmetric dense ``S``, exploiting diagonal ``F``."""
    if isinstance(F, Diagonal):
        # S ⊙ ddᵀ with d_i·d_j formed first (symmetric exactly), both in pool buffers
        d = F.diagonal
        dd = torch.outer(d, d, out=workspace.empty(S.shape, S))
        out = torch.mul(S, dd, out=workspace.empty(S.shape, S))
        workspace.give(dd)
        return out
    if isinstance(F, ScaledIdentity):
        return (F.scale * F.scale) * S
    W = identity_kronecker_factor(F)
    if W is not None:
        # F = I_R ⊗ W: (I ⊗ W)ᵀ S (I ⊗ W), block by block
        R, (m, n) = F.shape[0] // W.shape[0], W.shape
        if R == 1:
            return W.mT @ (S @ W)
        T = S.reshape(R, m, R, m) @ W  # (s, a, t, n): right factor applied
        T = (T.permute(0, 2, 3, 1) @ W).permute(0, 3, 1, 2)  # (s, j, t, n)
        return T.reshape(R * n, R * n)
    Fd = F.to_dense()
    return Fd.mT @ (S @ Fd)


def scaled_identity(n: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value·I_n``, never written to (``Q = εI + c·S`` is one ``torch.add``): cached for
    ``n ≤ 256``, where making it would cost as much as the stage's own small products;
    larger ones are made each time (``O(n²)`` beside the stage's ``O(n³)``), so the cache
    stays small however many dampings a program tries."""
    if n > 256:
        return torch.eye(n, dtype=dtype, device=device).mul_(value)
    return _small_scaled_identity(n, value, dtype, device)


@functools.lru_cache(maxsize=32)
def _small_scaled_identity(n: int, value: float, dtype: torch.dtype, device) -> Tensor:
    return torch.eye(n, dtype=dtype, device=device).mul_(value)


def congruence_is_dense(F: LinearOperator) -> bool:
    """Whether :func:`congruence` forms ``F`` densely (no cheaper structure to use)."""
    return not isinstance(F, (Diagonal, ScaledIdentity)) and identity_kronecker_factor(F) is None


def products_through_factors(F: LinearOperator) -> bool:
    """Whether products with ``F`` cost at most a quarter of a dense product
    (:meth:`~tallskinny.linalg.LinearOperator.apply_flops`), as for a convolution's
    ``F = P (I_R ⊗ W̄) U`` (``2·R·m·q_w`` per column against ``2·a_out·a_in``): then ``SF``
    and ``Fᵀ(SF)`` are made through ``F``'s factors rather than a dense ``F``."""
    a_out, a_in = F.shape
    return 4 * F.apply_flops() <= 2 * a_out * a_in


def plus(E: LinearOperator, X: Tensor) -> Tensor:
    """``E + X`` as a dense tensor (``X`` may be overwritten)."""
    if isinstance(E, Zero):
        return X
    if isinstance(E, Diagonal):
        X.diagonal().add_(E.diagonal)
        return X
    return X + E.to_dense()


class SymmetricFactor:
    """A symmetric matrix factored for solves, with its inertia and ``log|det|``.

    Cholesky when the matrix is positive definite (the common case near the loss and for
    Gauss–Newton); otherwise LU with partial pivoting, which solves many right-hand sides
    with BLAS-3 speed (LAPACK's Bunch–Kaufman solve does not). The inertia of an
    indefinite matrix is read from a Bunch–Kaufman ``D`` (Sylvester's law): the factor's
    own, or for LU one computed only when asked for.

    Schur complements ``S − Bᵀ Q⁻¹ B`` go through :meth:`schur_operands` (``Bᵀ Q⁻¹ B =
    Xᵀ Y``) and :meth:`complete` (``Q⁻¹ B x = complete(Y x)``). Asked for with ``half=True``
    and from order :data:`HALF_SOLVE_MIN_ORDER` on, they take one triangular solve:
    ``X = L⁻¹B``, ``Y = D⁻¹X`` (``XᵀY`` symmetric by construction), ``complete`` the rest
    of the solve, with Cholesky's ``L`` (``D = I``) or, for an indefinite matrix,
    Bunch–Kaufman ``LDLᵀ`` with an explicit ``L``
    (:func:`~tallskinny.linalg.ldl.explicit_ldl`) instead of LU — on the CPU and outside
    autograd only (the conversion runs on the host; the flop count assumes it there).
    Otherwise ``X = B``, ``Y = Q⁻¹B`` and nothing is left for ``complete``.
    """

    __slots__ = ("matrix", "_chol", "_lu", "_piv", "_ldl", "_half", "_factors", "_inertia", "_logdet")

    @classmethod
    def of(cls, Q: Tensor, terms: Sequence | None = None, inner: int = 0, *, half: bool = False) -> "SymmetricFactor | None":
        """The factorization, or ``None`` if ``Q`` is singular to working precision: a pivot
        (for ``LDLᵀ`` an eigenvalue of a block of ``D``) at or below
        ``pivot_tolerance(n, dtype, max|Q|)``.

        Where ``Q`` is a sum of terms that may cancel, its rounding errors, and so the
        pivots of a ``Q`` that is singular in exact arithmetic, scale with the terms, not
        with ``max|Q|``; then ``pivot_tolerance(inner, dtype, Σ terms)`` (``terms``: numbers
        or 0-dim tensors) bounds ``‖ΔQ‖₂``, and ``Q`` is also singular where its smallest
        ``|λ|`` is at or below it. By Weyl's theorem a singular ``Q`` has such an eigenvalue
        whatever the rounding; a pivot of LU or Cholesky, whose order of elimination is not
        rank-revealing, can exceed it several times (issue 14). Costs one ``eigvalsh``."""
        self = cls.__new__(cls)
        self.matrix, self._chol, self._lu, self._piv, self._inertia, self._logdet = Q, None, None, None, None, None
        self._factors = self._ldl = None
        n = Q.shape[0]
        self._half = half and n >= HALF_SOLVE_MIN_ORDER and Q.device.type == "cpu" and not Q.requires_grad
        parts = [max_abs(Q), Q.diagonal().min()]
        if terms is not None:
            parts += [t for t in terms if isinstance(t, Tensor)]
            parts.append(torch.linalg.eigvalsh(Q).abs().min())
        scale, diag_min, *rest = torch.stack(parts).tolist()  # one synchronisation
        if terms is not None:
            bound = sum(rest[:-1]) + sum(t for t in terms if not isinstance(t, Tensor))
            if rest[-1] <= pivot_tolerance(inner, Q.dtype, bound):
                return None
        tol = pivot_tolerance(n, Q.dtype, scale)
        if diag_min > 0:  # a negative diagonal entry rules out positive definiteness at once
            L, info = torch.linalg.cholesky_ex(Q)
            if not bool(info):
                if float(L.diagonal().min()) ** 2 <= tol:
                    return None
                self._chol = L
                self._inertia = Inertia(n, 0, 0)
                return self
        if self._half:
            ld, piv, info = torch.linalg.ldl_factor_ex(Q)
            if bool(info):
                return None
            self._ldl = explicit_ldl(ld, piv)
            if float(self._ldl.eigenvalues.abs().min()) <= tol:
                return None
            return self
        lu, piv, _ = torch.linalg.lu_factor_ex(Q)
        if float(lu.diagonal().abs().min()) <= tol:
            return None
        self._lu, self._piv = lu, piv
        return self

    @classmethod
    def unchecked(cls, Q: Tensor) -> "SymmetricFactor":
        """LU of ``Q`` without a singularity test (no host synchronisation): the caller
        tests all such factors at once with :func:`first_singular` before using them."""
        self = cls.__new__(cls)
        self.matrix, self._chol, self._inertia, self._logdet = Q, None, None, None
        self._factors = self._ldl = None
        self._half = False
        self._lu, self._piv, _ = torch.linalg.lu_factor_ex(Q)
        return self

    def solve(self, B: Tensor) -> Tensor:
        if B.dim() == 1 and self._lu is None:  # (LU's solve takes vectors itself)
            return self.solve(B.unsqueeze(-1)).squeeze(-1)
        if self._chol is not None:
            return in_layout_of(torch.cholesky_solve(B, self._chol), B)
        if self._ldl is not None:
            return self._ldl.solve(B)
        if self._factors is None:  # (made on the first solve: no synchronisation before)
            self._factors = LUFactors(self._lu, self._piv)
        return self._factors.solve(B)

    def schur_operands(self, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(X, Y)`` with ``Bᵀ Q⁻¹ B = Xᵀ Y`` and ``Q⁻¹ B = complete(Y)`` (see the class)."""
        if not self._half:
            return B, self.solve(B)
        if self._chol is not None:
            X = torch.linalg.solve_triangular(self._chol, B, upper=False)
            return X, X
        X = self._ldl.lower_solve(B)
        return X, self._ldl.pivot_solve(X)

    @property
    def symmetric_schur(self) -> bool:
        """Whether ``XᵀY`` of :meth:`schur_operands` is symmetric by construction (the
        half solves)."""
        return self._half

    def complete(self, Y: Tensor) -> Tensor:
        """``Q⁻¹ B x`` from ``Y x`` (``Y`` of :meth:`schur_operands`)."""
        if not self._half:
            return Y
        if self._chol is not None:
            return in_layout_of(torch.linalg.solve_triangular(self._chol.mT, Y, upper=True), Y)
        return self._ldl.upper_solve(Y)

    def logdet(self) -> Tensor:
        """``log|det|`` from the diagonal of the factor (computed on first request)."""
        if self._logdet is None:
            if self._chol is not None:
                self._logdet = 2.0 * self._chol.diagonal().log().sum()
            elif self._ldl is not None:
                self._logdet = self._ldl.eigenvalues.abs().log().sum()
            else:
                self._logdet = self._lu.diagonal().abs().log().sum()
        return self._logdet

    def inertia(self) -> Inertia:
        if self._inertia is None and self._ldl is not None:
            positive = int((self._ldl.eigenvalues > 0).sum())
            self._inertia = Inertia(positive, self.matrix.shape[0] - positive, 0)
        elif self._inertia is None:
            fill_inertias([self])  # LU's: from a Bunch–Kaufman factorization of the matrix
        return self._inertia


FILL_INERTIAS_BYTES = 32 * 2**20
"""Largest stack of pivots :func:`fill_inertias` factors in one batched call."""


def fill_inertias(factors: Sequence["SymmetricFactor"]) -> None:
    """The inertia of every factor in ``factors`` not yet known (LU's: from a Bunch–Kaufman
    ``LDLᵀ``), by batched ``ldl_factor_ex`` calls per size (stacks of at most
    :data:`FILL_INERTIAS_BYTES`) and one synchronisation in all, instead of one
    factorization and one synchronisation each."""
    by_size: dict[tuple, list[SymmetricFactor]] = {}
    for f in factors:
        if f._inertia is None and f._ldl is None:
            by_size.setdefault((f.matrix.shape[0], f.matrix.dtype, f.matrix.device), []).append(f)
    counts, groups = [], []
    for (n, dtype, _), same in by_size.items():
        if n == 0:
            for f in same:
                f._inertia = Inertia(0, 0, 0)
            continue
        per_stack = max(1, FILL_INERTIAS_BYTES // (n * n * dtype.itemsize))
        for start in range(0, len(same), per_stack):
            group = same[start : start + per_stack]
            ld, piv, _ = torch.linalg.ldl_factor_ex(torch.stack([f.matrix for f in group]))
            counts.append(ldl_positive_count(ld, piv))
            groups.append(group)
    if not counts:
        return
    positive = iter(torch.cat(counts).tolist())  # one synchronisation
    for group in groups:
        for f in group:
            pos = next(positive)
            f._inertia = Inertia(pos, f.matrix.shape[0] - pos, 0)


def first_singular(factors: Sequence[tuple[int, "SymmetricFactor"]]) -> int | None:
    """The index of the first factor (in the order given) whose LU has a pivot at or
    below ``pivot_tolerance(n, dtype, max|Q|)``, or ``None``: one synchronisation for
    all factors of a size (a non-finite pivot counts as singular too)."""
    by_size: dict[int, list[tuple[int, SymmetricFactor]]] = {}
    for index, f in factors:
        by_size.setdefault(f.matrix.shape[0], []).append((index, f))
    bad: list[int] = []
    for n, group in by_size.items():
        if n == 0:
            continue
        # the pivots and max|Q| of each factor, without copying the matrices into one stack
        pivots = torch.stack([f._lu.diagonal() for _, f in group]).abs().amin(dim=-1)
        scales = torch.stack([max_abs(f.matrix) for _, f in group])
        tol = pivot_tolerance(n, scales.dtype, 1.0) * scales
        ok = (pivots > tol).tolist()  # NaN compares False
        bad.extend(index for (index, _), fine in zip(group, ok) if not fine)
    if not bad:
        return None
    order = {index: k for k, (index, _) in enumerate(factors)}
    return min(bad, key=order.__getitem__)


def raise_if_null_directions(CtC: Tensor | None, index: int) -> None:
    """At ε = 0, a direction ``v`` with ``G v = 0``, ``A v = 0`` and ``Cᵀ v = 0`` is an
    exact null vector of ``H`` (no path carries it to the loss): say so at once. When
    ``C`` couples the complement to the input (``CtC ≠ 0``; the complement's rows of ``C``
    may be given instead of their Gram, which vanishes with them), ``H`` may still be
    regular and the caller falls back to the pivoted KKT factorization."""
    if CtC is None or not bool(CtC.any()):
        raise SingularSystemError(
            f"H + εI is singular at damping=0: the parameters of block {index} have directions "
            "that change neither its output nor, to second order, the loss",
            damping=0.0,
            stage=index,
        )


def zero_map(x: Tensor) -> Tensor:
    """``F x`` for ``F = 0``."""
    return torch.zeros_like(x)
