"""Dense reference solutions (eigendecomposition, float64) for the method tests."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import brentq

from tallskinny.linalg import Inertia, SingularMatrixError


class DenseFactorization:
    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        eig = torch.linalg.eigvalsh(matrix)
        tol = 1e-13 * max(1.0, float(eig.abs().max()))
        self._inertia = Inertia(int((eig > tol).sum()), int((eig < -tol).sum()), int((eig.abs() <= tol).sum()))
        if self._inertia.zero:
            raise SingularMatrixError("singular", block=None)

    def solve(self, b):
        return torch.linalg.solve(self.matrix, b)

    def inertia(self):
        return self._inertia


class DenseOperator:
    """``H`` as a dense symmetric matrix with the ``factorize``/``hvp`` interface."""

    def __init__(self, H: torch.Tensor):
        self.H = 0.5 * (H + H.T)
        self.factorizations = 0

    def factorize(self, damping: float):
        self.factorizations += 1
        return DenseFactorization(self.H + damping * torch.eye(len(self.H), dtype=self.H.dtype))

    def hvp(self, v):
        return self.H @ v


def trust_region_reference(H: torch.Tensor, g: torch.Tensor, radius: float):
    """``(x, λ)`` of ``min gᵀx + ½xᵀHx, ‖x‖ ≤ Δ`` from the eigendecomposition of ``H``."""
    evals, Q = np.linalg.eigh(H.numpy())
    c = Q.T @ g.numpy()
    lam1 = evals[0]

    def norm_at(lam):
        with np.errstate(divide="ignore"):
            return math.sqrt(float(np.sum((c / (evals + lam)) ** 2)))

    if lam1 > 0 and norm_at(0.0) <= radius:
        return torch.from_numpy(-Q @ (c / evals)), 0.0
    low = max(0.0, -lam1)
    scale = 1e-12 * max(1.0, abs(lam1))
    mask = np.abs(evals - lam1) <= scale
    if np.all(np.abs(c[mask]) <= 1e-14 * np.linalg.norm(c)) and low > 0 or (lam1 <= 0 and np.all(np.abs(c[mask]) < 1e-300)):
        # possibly the hard case: the norm at λ = −λ1 without the λ1-component
        rest = ~mask
        xr = -(c[rest] / (evals[rest] + low))
        if np.linalg.norm(xr) <= radius:
            x_rest = Q[:, rest] @ xr
            tau = math.sqrt(radius**2 - float(xr @ xr))
            return torch.from_numpy(x_rest + tau * Q[:, 0]), low
    upper = low + np.linalg.norm(c) / radius + 1.0
    while norm_at(upper) > radius:
        upper *= 2
    lam = brentq(lambda l: 1.0 / norm_at(l) - 1.0 / radius, low + 1e-300 if low > 0 else low, upper, xtol=1e-15, rtol=1e-15, maxiter=500)
    return torch.from_numpy(-Q @ (c / (evals + lam))), lam


def model_value(H, g, x):
    return float(g @ x + 0.5 * x @ (H @ x))
