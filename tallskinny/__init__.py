"""tallskinny: exact second-order calculus for deep networks that are a chain of blocks."""

from . import blocks, linalg, resources
from .chain import Chain
from .curvature import Curvature, Factorization
from .distributed import ShardMismatchError
from .errors import (
    AccuracyWarning,
    NondeterministicModuleError,
    ResourceError,
    SingularSystemError,
    StaleCurvatureError,
)
from .linalg import Inertia, SingularMatrixError

__version__ = "0.1.0.dev0"

__all__ = [
    "AccuracyWarning",
    "Chain",
    "Curvature",
    "Factorization",
    "Inertia",
    "NondeterministicModuleError",
    "ResourceError",
    "ShardMismatchError",
    "SingularMatrixError",
    "SingularSystemError",
    "StaleCurvatureError",
    "blocks",
    "linalg",
    "resources",
    "__version__",
]
