"""Exact routes besides the stagewise elimination, and the planner that picks one.

``kernel`` (the Gauss–Newton matrix from its ``P × N·c`` factor), ``dense`` (the ``P × P``
matrix, eigendecomposed) and :mod:`.planner` (costs from the shapes; ``method="auto"``).
"""

from .dense import DenseFactorization, DenseSpectrum
from .kernel import (
    KernelFactorization,
    OutputKernel,
    adjoint,
    loss_factor,
    loss_factor_blocks,
    output_loss_factor,
    per_sample_factor,
    tangent,
)
from .planner import METHODS, ROUTES, RouteCost, check_method, choose, explain, route_costs

__all__ = [
    "DenseFactorization",
    "DenseSpectrum",
    "KernelFactorization",
    "METHODS",
    "OutputKernel",
    "ROUTES",
    "RouteCost",
    "check_method",
    "choose",
    "explain",
    "adjoint",
    "loss_factor",
    "loss_factor_blocks",
    "output_loss_factor",
    "per_sample_factor",
    "tangent",
    "route_costs",
]
