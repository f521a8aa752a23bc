"""The dense route: ``M`` (the Hessian or the Gauss–Newton matrix) as a ``P × P`` matrix,
eigendecomposed once, ``M = Q diag(λ) Qᵀ``; then for any shift

    (M + εI)⁻¹ b = Q diag(1/(λ + ε)) Qᵀ b,    log|det(M + εI)| = Σ log|λ + ε|,

and the inertia counts the signs of ``λ + ε``. ``eigh`` is backward stable, so the
inertia is exact wherever ``min|λ + ε|`` exceeds the rounding of ``‖M‖``. Costs ``9P³``
flops and ``2P²`` numbers once: for small ``P`` and many samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SingularSystemError
from ..linalg import Inertia, pivot_tolerance


class DenseSpectrum:
    """The eigendecomposition of a symmetric ``P × P`` matrix, made once."""

    def __init__(self, M: Tensor):
        # a float32 matrix is decomposed in float64 (where it is exact): a singular verdict
        # then means the float32 matrix is singular, not that an eigenvalue fell below its eps
        self.dtype = M.dtype
        work = M.double() if M.dtype == torch.float32 else M
        self.eigenvalues, self.Q = torch.linalg.eigh(0.5 * (work + work.mT))
        self.P = M.shape[0]
        self.norm = float(self.eigenvalues.abs().max()) if self.P else 0.0

    def factorize(self, damping: float) -> "DenseRouteFactorization":
        return DenseRouteFactorization(self, damping)


class DenseRouteFactorization:
    """``M + εI`` through :class:`DenseSpectrum`."""

    def __init__(self, spectrum: DenseSpectrum, damping: float):
        self.spectrum, self.damping = spectrum, damping
        self.shifted = spectrum.eigenvalues + damping
        tol = pivot_tolerance(spectrum.P, self.shifted.dtype, spectrum.norm + abs(damping))
        small = self.shifted.abs() <= tol
        if bool(small.any()):
            raise SingularSystemError(
                f"M + εI is singular at damping={damping:g}: {int(small.sum())} eigenvalues within "
                f"rounding ({tol:.2g}) of zero",
                damping=damping,
            )
        self.norm_lower_bound = spectrum.norm

    def solve(self, b: Tensor) -> Tensor:
        Q = self.spectrum.Q
        return (Q @ ((Q.mT @ b.to(Q.dtype)) / self.shifted.unsqueeze(-1))).to(b.dtype)

    def logdet(self) -> Tensor:
        return self.shifted.abs().log().sum().to(self.spectrum.dtype)

    def sign(self) -> Tensor:
        return self.logdet().new_tensor(-1.0 if int((self.shifted < 0).sum()) % 2 else 1.0)

    def inertia(self) -> Inertia:
        positive = int((self.shifted > 0).sum())
        return Inertia(positive, self.spectrum.P - positive, 0)
