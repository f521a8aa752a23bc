"""Exact routes besides the stagewise elimination, and the planner that picks one.

``kernel`` (the Gauss–Newton matrix from its ``P × N·c`` factor), ``dense`` (the ``P × P``
matrix, eigendecomposed) and :mod:`.planner` (costs from the shapes; ``method="auto"``).
"""

from .dense import DenseRouteFactorization, DenseSpectrum
from .kernel import (
    KernelFactorization,
    KernelRouteFactorization,
    OutputKernel,
    adjoint,
    loss_factor,
    loss_factor_blocks,
    output_loss_factor,
    per_sample_factor,
    semidefinite_part,
    tangent,
)
from .krylov import Krylov, KrylovFactorization, KrylovInfo
from .planner import METHODS, ROUTES, RouteCost, check_method, choose, explain, resolve, route_costs

__all__ = [
    "DenseRouteFactorization",
    "DenseSpectrum",
    "KernelFactorization",
    "KernelRouteFactorization",
    "Krylov",
    "KrylovFactorization",
    "KrylovInfo",
    "METHODS",
    "OutputKernel",
    "ROUTES",
    "RouteCost",
    "check_method",
    "choose",
    "explain",
    "resolve",
    "adjoint",
    "loss_factor",
    "loss_factor_blocks",
    "output_loss_factor",
    "per_sample_factor",
    "semidefinite_part",
    "tangent",
    "route_costs",
]
