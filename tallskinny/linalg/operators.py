"""Elementary linear operators on flat vectors.

Every operator is an ``m × n`` matrix that acts on tensors of shape ``(n,)`` or
``(n, k)``. Operators keep their structure under ``@``, ``.T``, ``+``, ``-`` and scalar
``*`` where the result has that structure, and fall back to :class:`Dense` otherwise.
"""

from __future__ import annotations

import functools
import numbers
import torch
from torch import Tensor

from .errors import SingularMatrixError
from .factor import DenseFactorization, DiagonalFactorization
from .inertia import Inertia  # noqa: F401  (also importable from here, as before)


class LinearOperator:
    """Base class: an ``m × n`` matrix with a dtype and a device.

    Subclasses implement :meth:`to_dense` and :meth:`_matmat` (product with an
    ``(n, k)`` tensor); the rest has generic definitions that subclasses may improve.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = False

    # -- to implement -------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        raise NotImplementedError

    def _matmat(self, x: Tensor) -> Tensor:
        """``self @ x`` for a tensor ``x`` of shape ``(n, k)``, already validated."""
        raise NotImplementedError

    # -- may be called ------------------------------------------------------------------
    def matmat(self, x: Tensor) -> Tensor:
        """``self @ x`` for an ``(n, k)`` tensor, without the checks of ``@`` (for hot
        loops whose shapes are known to fit)."""
        return self._matmat(x)

    def _transpose(self) -> "LinearOperator":
        return Dense(self.to_dense().mT)

    def dense_block(self, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        """The dense submatrix ``self[rows][:, cols]`` (1-D int64 indices, in any order;
        ``None``: all). Generic: read from :meth:`to_dense`; operators that can build it
        from their nonzeros say so."""
        out = self.to_dense()
        out = out if rows is None else out.index_select(0, rows)
        return out if cols is None else out.index_select(1, cols)

    def apply_flops(self) -> int:
        """Floating-point operations of ``self @ x`` for one column, as :meth:`_matmat`
        does it (multiply-adds counted as two; gathers, permutations and elementwise
        scalings as none). Generic: ``2·m·n``, a dense product; structured operators
        say less."""
        rows, cols = self.shape
        return 2 * rows * cols

    def astype(self, dtype: torch.dtype) -> "LinearOperator":
        """The same operator in ``dtype`` (itself where it already is). Structured
        operators keep their structure; this default makes a :class:`Dense` copy."""
        if dtype == self.dtype:
            return self
        return Dense(self.to_dense().to(dtype), symmetric=self.symmetric)

    # -- generic algebra ----------------------------------------------------------------
    @property
    def T(self) -> "LinearOperator":
        """The transpose (made once and kept: operators are immutable)."""
        if self.symmetric:
            return self
        cached = self.__dict__.get("_transposed")
        if cached is None:
            cached = self._transpose()
            self.__dict__["_transposed"] = cached
            cached.__dict__.setdefault("_transposed", self)
        return cached

    def __matmul__(self, other):
        if isinstance(other, Tensor):
            x = _check_rhs(self, other)
            out = self._matmat(x if x.dim() == 2 else x.unsqueeze(-1))
            return out if x.dim() == 2 else out.squeeze(-1)
        if isinstance(other, LinearOperator):
            check_compatible(self, other, "matmul")
            return self._compose(other)
        return NotImplemented

    def __rmatmul__(self, other):
        if isinstance(other, Tensor):
            if other.dim() not in (1, 2) or other.shape[-1] != self.shape[0]:
                raise ValueError(
                    f"cannot multiply a tensor of shape {tuple(other.shape)} by a "
                    f"{type(self).__name__} of shape {self.shape}"
                )
            return (self.T @ other.mT).mT if other.dim() == 2 else self.T @ other
        return NotImplemented

    def _compose(self, other: "LinearOperator") -> "LinearOperator":
        """``self @ other``; by default asks ``other`` (which may know a structured
        product, see :meth:`_rcompose`) and otherwise falls back to :class:`Dense`."""
        result = other._rcompose(self)
        if result is not NotImplemented:
            return result
        return Dense(self @ other.to_dense())

    def _rcompose(self, left: "LinearOperator"):
        """``left @ self`` when ``self`` knows a structured result, else ``NotImplemented``."""
        return NotImplemented

    def _add(self, other: "LinearOperator") -> "LinearOperator":
        if isinstance(other, Zero):
            return self
        return Dense(self.to_dense() + other.to_dense())

    def _scale(self, alpha: float) -> "LinearOperator":
        return Dense(alpha * self.to_dense())

    def __add__(self, other):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        check_compatible(self, other, "add")
        return self._add(other)

    def __sub__(self, other):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return self + (-other)

    def __neg__(self):
        return self._scale(-1.0)

    def __mul__(self, alpha):
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            return self._scale(float(alpha))
        return NotImplemented

    __rmul__ = __mul__

    # -- solves --------------------------------------------------------------------------
    def factorize(self):
        """A factorization that solves for any number of right-hand sides.

        The default factors :meth:`to_dense`; structured operators override it.
        """

        return DenseFactorization(self.to_dense(), symmetric=self.symmetric)

    def solve(self, rhs: Tensor) -> Tensor:
        """``self⁻¹ rhs`` for ``rhs`` of shape ``(n,)`` or ``(n, k)``."""
        return self.factorize().solve(rhs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


# ---------------------------------------------------------------------------------------
class Dense(LinearOperator):
    """A matrix stored as a 2-D tensor. ``symmetric=True`` declares (not checks) symmetry."""

    def __init__(self, matrix: Tensor, *, symmetric: bool = False):
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ValueError(f"Dense needs a 2-D tensor, got {_describe(matrix)}")
        _check_float(matrix, "Dense")
        if symmetric and matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a symmetric Dense must be square, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.symmetric = symmetric

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Dense(self.matrix.to(dtype), symmetric=self.symmetric)

    def to_dense(self) -> Tensor:
        return self.matrix

    def _matmat(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def _transpose(self) -> LinearOperator:
        return Dense(self.matrix.mT)

    def _scale(self, alpha: float) -> LinearOperator:
        return Dense(alpha * self.matrix, symmetric=self.symmetric)

    def _add(self, other: LinearOperator) -> LinearOperator:
        if isinstance(other, Zero):
            return self
        return Dense(self.matrix + other.to_dense(), symmetric=self.symmetric and other.symmetric)


class Zero(LinearOperator):
    """The ``m × n`` zero matrix; nothing is stored."""

    def __init__(self, m: int, n: int, *, dtype: torch.dtype = torch.float64, device=None):
        self.shape = (int(m), int(n))
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.symmetric = self.shape[0] == self.shape[1]

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Zero(*self.shape, dtype=dtype, device=self.device)

    def to_dense(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def apply_flops(self) -> int:
        return 0  # (elementwise: not counted)

    def _matmat(self, x: Tensor) -> Tensor:
        return x.new_zeros((self.shape[0], x.shape[1]))

    def _transpose(self) -> LinearOperator:
        return Zero(self.shape[1], self.shape[0], dtype=self.dtype, device=self.device)

    def _compose(self, other: LinearOperator) -> LinearOperator:
        return Zero(self.shape[0], other.shape[1], dtype=self.dtype, device=self.device)

    def _rcompose(self, left: LinearOperator) -> LinearOperator:
        return Zero(left.shape[0], self.shape[1], dtype=self.dtype, device=self.device)

    def _scale(self, alpha: float) -> LinearOperator:
        return self

    def _add(self, other: LinearOperator) -> LinearOperator:
        return other

    def factorize(self):

        if self.shape[0] != self.shape[1]:
            raise ValueError(f"cannot factorize a non-square operator of shape {self.shape}")
        raise SingularMatrixError(f"a Zero operator of shape {self.shape} is singular")


class ScaledIdentity(LinearOperator):
    """``scale · I_n``."""

    def __init__(self, n: int, scale: float = 1.0, *, dtype: torch.dtype = torch.float64, device=None):
        if not dtype.is_floating_point:
            raise TypeError(f"ScaledIdentity needs a floating-point dtype, got {dtype}")
        self.shape = (int(n), int(n))
        self.scale = float(scale)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.symmetric = True

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else ScaledIdentity(self.shape[0], self.scale, dtype=dtype, device=self.device)

    def to_dense(self) -> Tensor:
        return self.scale * torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def apply_flops(self) -> int:
        return 0  # (elementwise: not counted)

    def _matmat(self, x: Tensor) -> Tensor:
        return x.clone() if self.scale == 1.0 else self.scale * x

    def _compose(self, other: LinearOperator) -> LinearOperator:
        return other._scale(self.scale) if self.scale != 1.0 else other

    def _rcompose(self, left: LinearOperator) -> LinearOperator:
        return left._scale(self.scale) if self.scale != 1.0 else left

    def _scale(self, alpha: float) -> LinearOperator:
        return ScaledIdentity(self.shape[0], alpha * self.scale, dtype=self.dtype, device=self.device)

    def _add(self, other: LinearOperator) -> LinearOperator:
        if isinstance(other, Zero):
            return self
        if isinstance(other, ScaledIdentity):
            return self._with_scale(self.scale + other.scale)
        if isinstance(other, Diagonal):
            return Diagonal(other.diagonal + self.scale)
        return other._add(self)

    def factorize(self):

        n = self.shape[0]
        return DiagonalFactorization(torch.full((n,), self.scale, dtype=self.dtype, device=self.device))

    def _with_scale(self, scale: float) -> "ScaledIdentity":
        return ScaledIdentity(self.shape[0], scale, dtype=self.dtype, device=self.device)


def Identity(n: int, *, dtype: torch.dtype = torch.float64, device=None) -> ScaledIdentity:
    """The ``n × n`` identity (a :class:`ScaledIdentity` with scale 1; operators are
    immutable, so one object per size, dtype and device is shared)."""
    return _identity(int(n), dtype, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=1024)
def _identity(n: int, dtype: torch.dtype, device: torch.device) -> ScaledIdentity:
    return ScaledIdentity(n, 1.0, dtype=dtype, device=device)


class Diagonal(LinearOperator):
    """``diag(d)`` for a 1-D tensor ``d``."""

    def __init__(self, diagonal: Tensor):
        if not isinstance(diagonal, Tensor) or diagonal.dim() != 1:
            raise ValueError(f"Diagonal needs a 1-D tensor, got {_describe(diagonal)}")
        _check_float(diagonal, "Diagonal")
        self.diagonal = diagonal
        n = diagonal.shape[0]
        self.shape = (n, n)
        self.dtype = diagonal.dtype
        self.device = diagonal.device
        self.symmetric = True

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else Diagonal(self.diagonal.to(dtype))

    def to_dense(self) -> Tensor:
        return torch.diag(self.diagonal)

    def apply_flops(self) -> int:
        return 0  # (elementwise: not counted)

    def _matmat(self, x: Tensor) -> Tensor:
        return self.diagonal.unsqueeze(-1) * x

    def _compose(self, other: LinearOperator) -> LinearOperator:
        if isinstance(other, Diagonal):
            return Diagonal(self.diagonal * other.diagonal)
        if isinstance(other, Dense):
            return Dense(self.diagonal.unsqueeze(-1) * other.matrix)
        return super()._compose(other)

    def _rcompose(self, left: LinearOperator):
        if isinstance(left, Dense):
            return Dense(left.matrix * self.diagonal)
        return NotImplemented

    def _scale(self, alpha: float) -> LinearOperator:
        return Diagonal(alpha * self.diagonal)

    def _add(self, other: LinearOperator) -> LinearOperator:
        if isinstance(other, Diagonal):
            return Diagonal(self.diagonal + other.diagonal)
        return other._add(self)

    def factorize(self):

        return DiagonalFactorization(self.diagonal)


class LowRank(LinearOperator):
    """The symmetric ``U M Uᵀ`` for ``U`` (``n × k``) and a symmetric ``M`` (``k × k``),
    stored as its factors: products cost ``O(n·k)``, and a solver can work on ``range(U)``
    (``k ≪ n``) instead of all of ``ℝⁿ``. ``M``'s symmetry is declared, not checked."""

    def __init__(self, U: Tensor, M: Tensor):
        if not isinstance(U, Tensor) or U.dim() != 2:
            raise ValueError(f"LowRank needs a 2-D tensor U, got {_describe(U)}")
        if not isinstance(M, Tensor) or M.shape != (U.shape[1], U.shape[1]):
            raise ValueError(f"LowRank needs M of shape {(U.shape[1], U.shape[1])} for U of shape {tuple(U.shape)}, got {_describe(M)}")
        _check_float(U, "LowRank")
        _check_float(M, "LowRank")
        if M.dtype != U.dtype or M.device != U.device:
            raise ValueError("LowRank: U and M must have the same dtype and device")
        self.U, self.M = U, M
        n = U.shape[0]
        self.shape = (n, n)
        self.dtype, self.device = U.dtype, U.device
        self.symmetric = True

    def astype(self, dtype: torch.dtype) -> LinearOperator:
        return self if dtype == self.dtype else LowRank(self.U.to(dtype), self.M.to(dtype))

    def to_dense(self) -> Tensor:
        return self.U @ self.M @ self.U.mT

    def apply_flops(self) -> int:
        n, k = self.U.shape
        return 4 * n * k + 2 * k * k

    def _matmat(self, x: Tensor) -> Tensor:
        return self.U @ (self.M @ (self.U.mT @ x))

    def _scale(self, alpha: float) -> LinearOperator:
        return LowRank(self.U, alpha * self.M)


# ---------------------------------------------------------------------------------------
def as_operator(x) -> LinearOperator:
    """A tensor becomes :class:`Dense`; an operator is returned as is."""
    if isinstance(x, LinearOperator):
        return x
    if isinstance(x, Tensor):
        return Dense(x)
    raise TypeError(f"expected a torch.Tensor or a LinearOperator, got {type(x).__name__}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"an object of type {type(x).__name__}"


def _check_float(t: Tensor, where: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where} needs a floating-point tensor, got dtype {t.dtype}")


def check_compatible(a: LinearOperator, b: LinearOperator, op: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"cannot {op} operators of dtypes {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"cannot {op} operators on devices {a.device} and {b.device}")
    if op == "matmul" and a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply shapes {a.shape} and {b.shape}")
    if op == "add" and a.shape != b.shape:
        raise ValueError(f"cannot add shapes {a.shape} and {b.shape}")


def _check_rhs(op: LinearOperator, x: Tensor) -> Tensor:
    if x.dim() not in (1, 2) or x.shape[0] != op.shape[1]:
        raise ValueError(
            f"{type(op).__name__} of shape {op.shape} needs a vector of shape "
            f"({op.shape[1]},) or ({op.shape[1]}, k), got {tuple(x.shape)}"
        )
    if x.dtype != op.dtype:
        raise TypeError(f"{type(op).__name__} has dtype {op.dtype}, the vector has dtype {x.dtype}")
    if x.device != op.device:
        raise ValueError(f"{type(op).__name__} is on {op.device}, the vector is on {x.device}")
    return x
