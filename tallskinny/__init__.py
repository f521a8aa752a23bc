"""tallskinny: exact second-order calculus for deep networks that are a chain of blocks."""

from . import blocks, linalg, resources
from .chain import Chain
from .curvature import Curvature, Factorization
from .distributed import ShardMismatchError
from .errors import (
    AccuracyWarning,
    ConvergenceError,
    ConvergenceWarning,
    NondeterministicModuleError,
    ResourceError,
    SingularSystemError,
    StaleCurvatureError,
    UnsupportedOnRouteError,
)
from .linalg import Inertia, SingularMatrixError

__version__ = "0.1.0.dev0"

__all__ = [
    "AccuracyWarning",
    "Chain",
    "ConvergenceError",
    "ConvergenceWarning",
    "Curvature",
    "Factorization",
    "Inertia",
    "NondeterministicModuleError",
    "ResourceError",
    "ShardMismatchError",
    "SingularMatrixError",
    "SingularSystemError",
    "StaleCurvatureError",
    "UnsupportedOnRouteError",
    "blocks",
    "linalg",
    "resources",
    "__version__",
]
