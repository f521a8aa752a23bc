"""Block-partitioned operators with ragged block sizes.

A block operator is partitioned into ``n × n`` blocks, block ``(i, j)`` of shape
``row_sizes[i] × col_sizes[j]``, of which only the diagonal and at most one sub- and
one super-diagonal are stored:

===============================  ==========================================  ========================
class                            stored blocks                               diagonal blocks
===============================  ==========================================  ========================
:class:`BlockDiagonal`           ``(i, i)``                                  any shape
:class:`BlockLowerBidiagonal`    ``(i, i)``, ``(i+1, i)``                    square
:class:`BlockUpperBidiagonal`    ``(i, i)``, ``(i, i+1)``                    square
:class:`BlockTridiagonal`        ``(i, i)``, ``(i+1, i)``, ``(i, i+1)``      square
:class:`SymmetricBlockTridiagonal`  ``(i, i)``, ``(i+1, i)``; ``(i, i+1)`` = ``(i+1, i)ᵀ``  square, symmetric
===============================  ==========================================  ========================

Blocks are 2-D tensors (wrapped as :class:`Dense`) or any :class:`LinearOperator`
(nesting is allowed). All blocks share one dtype (float32 or float64) and one device.
Products with vectors are computed block by block. Sums, scalings, transposes and
products keep the block structure whenever the result has one.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from .batching import same_shape_batches
from .errors import SingularMatrixError
from .factor import (
    DEFAULT_ALPHA,
    BlockBidiagonalFactorization,
    BlockDiagonalFactorization,
    BlockTridiagonalLDL,
    BlockTridiagonalLU,
    MatrixFactorization,
)
from .operators import Dense, Diagonal, LinearOperator, ScaledIdentity, Zero

_FLOAT_TYPES = (torch.float32, torch.float64)

Blocks = Iterable["Tensor | LinearOperator"]


class BlockOperator(LinearOperator):
    """Base of the block operators: a block-banded matrix with bandwidths at most one.

    Attributes: ``diagonal`` (tuple of operators), ``lower`` and ``upper`` (tuples of
    ``n - 1`` operators, or ``None`` when that diagonal is structurally zero),
    ``row_sizes``/``col_sizes`` (the block partition) and ``row_offsets``/``col_offsets``
    (its ``n + 1`` cumulative sums).
    """

    diagonal: tuple[LinearOperator, ...]
    lower: tuple[LinearOperator, ...] | None = None
    upper: tuple[LinearOperator, ...] | None = None
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    row_offsets: tuple[int, ...]
    col_offsets: tuple[int, ...]

    # -- construction ----------------------------------------------------------------------
    def _setup(self, diagonal, lower, upper, *, square: bool, symmetric: bool = False) -> None:
        name = type(self).__name__
        diag = _as_blocks(diagonal, "diagonal", name)
        n = len(diag)
        if n == 0:
            raise ValueError(f"{name} needs at least one diagonal block, got none")
        dtype, device = diag[0].dtype, diag[0].device
        if dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name}: blocks must be float32 or float64, diagonal block 0 has dtype {dtype}")
        for i, d in enumerate(diag):
            where = f"diagonal block {i}"
            _check_same(name, where, d, dtype, device)
            if square and d.shape[0] != d.shape[1]:
                raise ValueError(f"{name}: {where} has shape {d.shape}; diagonal blocks must be square")
            if square and d.shape[0] == 0:
                raise ValueError(f"{name}: {where} has shape {d.shape}; blocks must not be empty")
        rows = tuple(d.shape[0] for d in diag)
        cols = tuple(d.shape[1] for d in diag)
        checked = {}
        for label, blocks, dr, dc in (("lower", lower, 1, 0), ("upper", upper, 0, 1)):
            if blocks is None:
                checked[label] = None
                continue
            ops = _as_blocks(blocks, label, name)
            if len(ops) != n - 1:
                raise ValueError(
                    f"{name}: '{label}' has {len(ops)} blocks, expected {n - 1} "
                    f"(one fewer than the {n} diagonal blocks)"
                )
            for i, b in enumerate(ops):
                r, c = i + dr, i + dc
                where = f"{label} block {i} (block ({r}, {c}) of the matrix)"
                _check_same(name, where, b, dtype, device)
                expected = (rows[r], cols[c])
                if b.shape != expected:
                    raise ValueError(
                        f"{name}: {where} has shape {b.shape}, expected {expected} to fit diagonal "
                        f"blocks {r} (shape {diag[r].shape}) and {c} (shape {diag[c].shape})"
                    )
            checked[label] = ops
        self._assign(diag, checked["lower"], checked["upper"], symmetric)

    def _assign(self, diagonal, lower, upper, symmetric: bool) -> None:
        self.diagonal = tuple(diagonal)
        self.lower = None if lower is None else tuple(lower)
        self.upper = None if upper is None else tuple(upper)
        self.row_sizes = tuple(d.shape[0] for d in self.diagonal)
        self.col_sizes = tuple(d.shape[1] for d in self.diagonal)
        self.row_offsets = _offsets(self.row_sizes)
        self.col_offsets = _offsets(self.col_sizes)
        self.shape = (self.row_offsets[-1], self.col_offsets[-1])
        self.dtype = self.diagonal[0].dtype
        self.device = self.diagonal[0].device
        self.symmetric = symmetric

    @property
    def num_blocks(self) -> int:
        """The number ``n`` of diagonal blocks."""
        return len(self.diagonal)

    def block(self, i: int, j: int) -> LinearOperator | None:
        """Block ``(i, j)``, or ``None`` where the structure says it is zero."""
        if i == j:
            return self.diagonal[i]
        if i == j + 1 and self.lower is not None:
            return self.lower[j]
        if j == i + 1 and self.upper is not None:
            return self.upper[i]
        return None

    # -- dense and products ------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        ro, co = self.row_offsets, self.col_offsets
        for i, j, b in self.stored_blocks():
            if not isinstance(b, Zero):
                out[ro[i] : ro[i + 1], co[j] : co[j + 1]] = b.to_dense()
        return out

    def stored_blocks(self):
        """Yield ``(i, j, block)`` for every stored block (diagonal, then lower, then upper)."""
        n = self.num_blocks
        for i in range(n):
            yield i, i, self.diagonal[i]
        if self.lower is not None:
            for i in range(n - 1):
                yield i + 1, i, self.lower[i]
        if self.upper is not None:
            for i in range(n - 1):
                yield i, i + 1, self.upper[i]

    def _matmat(self, x: Tensor) -> Tensor:
        xs = x.split(self.col_sizes)
        n = self.num_blocks
        lower, upper = self.lower, self.upper
        ys = []
        for i in range(n):
            y = _apply(self.diagonal[i], xs[i])
            if lower is not None and i > 0:
                y = _apply_add(y, lower[i - 1], xs[i - 1])
            if upper is not None and i < n - 1:
                y = _apply_add(y, upper[i], xs[i + 1])
            ys.append(y)
        return torch.cat(ys)

    # -- algebra --------------------------------------------------------------------------
    def _transpose(self) -> LinearOperator:
        return _build(
            [d.T for d in self.diagonal],
            None if self.upper is None else [u.T for u in self.upper],
            None if self.lower is None else [b.T for b in self.lower],
            self.symmetric,
        )

    def _scale(self, alpha: float) -> LinearOperator:
        def scaled(blocks):
            return None if blocks is None else [b._scale(alpha) for b in blocks]

        return _build(scaled(self.diagonal), scaled(self.lower), scaled(self.upper), self.symmetric)

    def _add(self, other: LinearOperator) -> LinearOperator:
        if isinstance(other, Zero):
            return self
        partner = self._as_partner(other, self.row_sizes, self.col_sizes)
        if partner is None:
            return Dense(self.to_dense() + other.to_dense(), symmetric=self.symmetric and other.symmetric)

        def union(a, b):
            if a is None:
                return None if b is None else list(b)
            if b is None:
                return list(a)
            return [x + y for x, y in zip(a, b)]

        return _build(
            union(self.diagonal, partner.diagonal),
            union(self.lower, partner.lower),
            union(self.upper, partner.upper),
            self.symmetric and partner.symmetric,
        )

    def _compose(self, other: LinearOperator) -> LinearOperator:
        partner = None if isinstance(other, (Zero, ScaledIdentity)) else self._as_partner(other, self.col_sizes, None)
        if partner is not None:
            product = _band_product(self, partner)
            if product is not None:
                return product
        return super()._compose(other)

    def _rcompose(self, left: LinearOperator):
        if isinstance(left, BlockOperator):
            return NotImplemented  # left._compose already tried
        partner = self._as_partner(left, None, self.row_sizes)
        if partner is not None:
            product = _band_product(partner, self)
            if product is not None:
                return product
        return NotImplemented

    @staticmethod
    def _as_partner(other, rows, cols) -> "BlockOperator | None":
        """``other`` as a block operator on the partition ``rows × cols`` (either may be
        ``None``: taken from ``other``), or ``None`` if it has none."""
        if isinstance(other, BlockOperator):
            if (rows is None or other.row_sizes == rows) and (cols is None or other.col_sizes == cols):
                return other
            return None
        sizes = rows if rows is not None else cols
        if sizes is None or (rows is not None and cols is not None and rows != cols):
            return None
        if isinstance(other, ScaledIdentity):
            blocks = [ScaledIdentity(s, other.scale, dtype=other.dtype, device=other.device) for s in sizes]
            return BlockDiagonal._unchecked(blocks)
        if isinstance(other, Diagonal):
            return BlockDiagonal._unchecked([Diagonal(d) for d in other.diagonal.split(list(sizes))])
        return None

    @classmethod
    def _unchecked(cls, diagonal, lower=None, upper=None, symmetric: bool = False):
        obj = cls.__new__(cls)
        obj._assign(diagonal, lower, upper, symmetric)
        return obj

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        """The same block structure, each block in ``dtype``."""
        if dtype == self.dtype:
            return self

        def cast(blocks):
            return None if blocks is None else [b.astype(dtype) for b in blocks]

        return type(self)._unchecked(cast(self.diagonal), cast(self.lower), cast(self.upper), self.symmetric)

    def __repr__(self) -> str:
        sizes = _summarize(self.row_sizes)
        if self.col_sizes != self.row_sizes:
            sizes += " × " + _summarize(self.col_sizes)
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, blocks={sizes})"


# ---------------------------------------------------------------------------------------
class BlockDiagonal(BlockOperator):
    """``diag(B_0, …, B_{n-1})``; blocks may be rectangular.

    Symmetric when every block is. ``factorize()`` factors each block on its own
    (nested operators use their own factorization); a block-diagonal matrix with a
    non-square block is singular.
    """

    def __init__(self, blocks: Blocks):
        self._setup(blocks, None, None, square=False)
        self.symmetric = all(b.symmetric for b in self.diagonal)

    @classmethod
    def _unchecked(cls, diagonal, lower=None, upper=None, symmetric: bool = False):
        obj = super()._unchecked(diagonal)
        obj.symmetric = all(b.symmetric for b in obj.diagonal)
        return obj

    def factorize(self) -> MatrixFactorization:
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"cannot factorize a non-square {type(self).__name__} of shape {self.shape}")
        for i, b in enumerate(self.diagonal):
            if b.shape[0] != b.shape[1]:
                raise SingularMatrixError(
                    f"BlockDiagonal: diagonal block {i} has shape {b.shape}; a block-diagonal "
                    "matrix with a non-square block is singular",
                    block=i,
                )
        return BlockDiagonalFactorization(_factor_each(self.diagonal, type(self).__name__))


class BlockLowerBidiagonal(BlockOperator):
    """Square diagonal blocks ``D_i`` and sub-diagonal blocks ``lower[i]`` = block ``(i+1, i)``.

    ``factorize()`` is block forward substitution; the matrix is singular exactly
    when a diagonal block is.
    """

    def __init__(self, diagonal: Blocks, lower: Blocks):
        self._setup(diagonal, lower, None, square=True)

    def factorize(self) -> MatrixFactorization:
        factors = _factor_each(self.diagonal, type(self).__name__)
        return BlockBidiagonalFactorization(factors, self.lower, lower=True)


class BlockUpperBidiagonal(BlockOperator):
    """Square diagonal blocks ``D_i`` and super-diagonal blocks ``upper[i]`` = block ``(i, i+1)``.

    ``factorize()`` is block backward substitution; the matrix is singular exactly
    when a diagonal block is.
    """

    def __init__(self, diagonal: Blocks, upper: Blocks):
        self._setup(diagonal, None, upper, square=True)

    def factorize(self) -> MatrixFactorization:
        factors = _factor_each(self.diagonal, type(self).__name__)
        return BlockBidiagonalFactorization(factors, self.upper, lower=False)


class BlockTridiagonal(BlockOperator):
    """Square diagonal blocks ``D_i``; ``lower[i]`` is block ``(i+1, i)``, ``upper[i]`` block ``(i, i+1)``.

    ``factorize()`` is block LU with partial pivoting restricted to the band
    (:class:`~tallskinny.linalg.factor.BlockTridiagonalLU`), backward stable like LAPACK
    ``gbsv`` and indifferent to singular diagonal blocks.
    """

    def __init__(self, diagonal: Blocks, lower: Blocks, upper: Blocks):
        self._setup(diagonal, lower, upper, square=True)

    def factorize(self) -> MatrixFactorization:
        diag, low, up = _dense(self.diagonal), _dense(self.lower), _dense(self.upper)
        return BlockTridiagonalLU(diag, low, up)


class SymmetricBlockTridiagonal(BlockTridiagonal):
    """A symmetric block-tridiagonal matrix: diagonal blocks ``D_i`` (symmetric) and
    sub-diagonal blocks ``lower[i]`` = block ``(i+1, i)``; block ``(i, i+1)`` is ``lower[i]ᵀ``.

    The diagonal blocks are *assumed* symmetric; the constructor checks it up to
    rounding (``max|D − Dᵀ| ≤ √eps · max|D|``) and raises on a grossly asymmetric block
    (blocks declared symmetric — ``Dense(…, symmetric=True)``, ``Diagonal``, … — are
    trusted). The factorizations read only the lower triangles of the diagonal blocks.

    ``factorize(alpha=…)`` is the block LDLᵀ with delayed pivots of
    :class:`~tallskinny.linalg.factor.BlockTridiagonalLDL`, which gives ``solve``,
    ``logdet``, ``sign`` and ``inertia``.
    """

    def __init__(self, diagonal: Blocks, lower: Blocks):
        self._setup(diagonal, lower, None, square=True, symmetric=True)
        self.upper = tuple(b.T for b in self.lower)
        _check_symmetric_blocks(self.diagonal, type(self).__name__)

    @classmethod
    def _unchecked(cls, diagonal, lower=None, upper=None, symmetric: bool = True):
        obj = cls.__new__(cls)
        obj._assign(diagonal, lower, [b.T for b in lower], True)
        return obj

    def factorize(self, *, alpha: float = DEFAULT_ALPHA) -> MatrixFactorization:
        return BlockTridiagonalLDL(_dense(self.diagonal), _dense(self.lower), alpha=alpha)


# ---------------------------------------------------------------------------------------
def _build(diagonal, lower, upper, symmetric: bool) -> BlockOperator:
    """The block class for this pattern, without re-validating the blocks."""
    if lower is None and upper is None:
        return BlockDiagonal._unchecked(diagonal)
    if lower is not None and upper is not None:
        if symmetric:
            return SymmetricBlockTridiagonal._unchecked(diagonal, lower)
        return BlockTridiagonal._unchecked(diagonal, lower, upper)
    if lower is not None:
        return BlockLowerBidiagonal._unchecked(diagonal, lower)
    return BlockUpperBidiagonal._unchecked(diagonal, None, upper)


def _band_product(a: BlockOperator, b: BlockOperator) -> BlockOperator | None:
    """``a @ b`` for block operators on matching partitions, if the result is block-banded
    with bandwidths at most one (and square diagonal blocks where it has off-diagonals)."""
    lower_bw = (a.lower is not None) + (b.lower is not None)
    upper_bw = (a.upper is not None) + (b.upper is not None)
    if lower_bw > 1 or upper_bw > 1:
        return None
    if (lower_bw or upper_bw) and a.row_sizes != b.col_sizes:
        return None
    n = a.num_blocks

    def entry(i: int, j: int) -> LinearOperator:
        total = None
        for k in (i - 1, i, i + 1):
            if 0 <= k < n:
                x, y = a.block(i, k), b.block(k, j)
                if x is not None and y is not None:
                    term = x @ y
                    total = term if total is None else total + term
        if total is None:
            return Zero(a.row_sizes[i], b.col_sizes[j], dtype=a.dtype, device=a.device)
        return total

    diagonal = [entry(i, i) for i in range(n)]
    lower = [entry(i + 1, i) for i in range(n - 1)] if lower_bw else None
    upper = [entry(i, i + 1) for i in range(n - 1)] if upper_bw else None
    return _build(diagonal, lower, upper, False)


def _as_blocks(blocks, label: str, name: str) -> list[LinearOperator]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable) and not isinstance(blocks, Tensor):
        raise TypeError(f"{name}: '{label}' must be a sequence of blocks, got {type(blocks).__name__}")
    out = []
    for i, b in enumerate(blocks):
        if isinstance(b, LinearOperator):
            out.append(b)
        elif isinstance(b, Tensor):
            if b.dim() != 2:
                raise ValueError(
                    f"{name}: {label} block {i} must be a 2-D tensor or a LinearOperator, "
                    f"got a tensor of shape {tuple(b.shape)}"
                )
            if b.dtype not in _FLOAT_TYPES:
                raise TypeError(f"{name}: {label} block {i} has dtype {b.dtype}; blocks must be float32 or float64")
            out.append(Dense(b))
        else:
            raise TypeError(
                f"{name}: {label} block {i} must be a torch.Tensor or a LinearOperator, got {type(b).__name__}"
            )
    return out


def _check_same(name: str, where: str, b: LinearOperator, dtype: torch.dtype, device: torch.device) -> None:
    if b.dtype != dtype:
        raise TypeError(
            f"{name}: {where} has dtype {b.dtype}, but diagonal block 0 has dtype {dtype}; "
            "all blocks must share one dtype"
        )
    if b.device != device:
        raise ValueError(
            f"{name}: {where} is on device {b.device}, but diagonal block 0 is on {device}; "
            "all blocks must be on one device"
        )


def _check_symmetric_blocks(blocks: Sequence[LinearOperator], name: str) -> None:
    """Raise if a diagonal block not declared symmetric is grossly asymmetric (small blocks
    of one size batched)."""
    unchecked = [i for i, b in enumerate(blocks) if not b.symmetric]
    if not unchecked:
        return
    rtol = torch.finfo(blocks[0].dtype).eps ** 0.5
    for run in same_shape_batches([tuple(blocks[i].shape) for i in unchecked]):
        indices = [unchecked[i] for i in run]
        stack = torch.stack([blocks[i].to_dense() for i in indices])
        asym = (stack - stack.mT).abs().amax(dim=(-2, -1))
        size = stack.abs().amax(dim=(-2, -1))
        bad = asym > rtol * size
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: diagonal block {indices[k]} is not symmetric: max|D − Dᵀ| = "
                f"{asym[k].item():.3g} exceeds √eps·max|D| = {(rtol * size[k]).item():.3g}"
            )


def _factor_each(blocks: Sequence[LinearOperator], name: str) -> list[MatrixFactorization]:
    factors = []
    for i, b in enumerate(blocks):
        try:
            factors.append(b.factorize())
        except SingularMatrixError as err:
            raise SingularMatrixError(f"{name}: diagonal block {i} is singular: {err}", block=i) from err
    return factors


def _dense(blocks):
    return None if blocks is None else [b.to_dense() for b in blocks]


def _apply(op: LinearOperator, x: Tensor) -> Tensor:
    if type(op) is Dense:
        return op.matrix @ x
    return op._matmat(x)


def _apply_add(y: Tensor, op: LinearOperator, x: Tensor) -> Tensor:
    if type(op) is Dense:
        return torch.addmm(y, op.matrix, x)
    if isinstance(op, Zero):
        return y
    return y + op._matmat(x)


def _offsets(sizes: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return tuple(out)


def _summarize(sizes: Sequence[int]) -> str:
    if len(set(sizes)) == 1:
        return f"{len(sizes)}×{sizes[0]}"
    if len(sizes) <= 6:
        return str(list(sizes))
    return f"[{sizes[0]}, {sizes[1]}, …, {sizes[-1]}] ({len(sizes)} blocks)"


__all__ = [
    "BlockDiagonal",
    "BlockLowerBidiagonal",
    "BlockOperator",
    "BlockTridiagonal",
    "BlockUpperBidiagonal",
    "SymmetricBlockTridiagonal",
]
