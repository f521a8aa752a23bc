"""Block-partitioned linear operators and a stable block-tridiagonal solver.

This subpackage depends on torch only: it knows nothing of ``torch.nn`` or of the
rest of :mod:`tallskinny`, and is usable on its own for structured linear systems.
"""

from .block import (
    BlockDiagonal,
    BlockLowerBidiagonal,
    BlockOperator,
    BlockTridiagonal,
    BlockUpperBidiagonal,
    SymmetricBlockTridiagonal,
)
from .errors import SingularMatrixError
from .factor import (
    BlockBidiagonalFactorization,
    BlockDiagonalFactorization,
    BlockTridiagonalLDL,
    BlockTridiagonalLU,
    DenseFactorization,
    DiagonalFactorization,
    Factorization,
    MatrixFactorization,
    pivot_tolerance,
)
from .inertia import Inertia
from .operators import Dense, Diagonal, Identity, LinearOperator, LowRank, ScaledIdentity, Zero, as_operator

__all__ = [
    "BlockBidiagonalFactorization",
    "BlockDiagonal",
    "BlockDiagonalFactorization",
    "BlockLowerBidiagonal",
    "BlockOperator",
    "BlockTridiagonal",
    "BlockTridiagonalLDL",
    "BlockTridiagonalLU",
    "BlockUpperBidiagonal",
    "Dense",
    "DenseFactorization",
    "Diagonal",
    "DiagonalFactorization",
    "Factorization",
    "Identity",
    "Inertia",
    "LinearOperator",
    "LowRank",
    "MatrixFactorization",
    "ScaledIdentity",
    "SingularMatrixError",
    "SymmetricBlockTridiagonal",
    "Zero",
    "as_operator",
    "pivot_tolerance",
]
