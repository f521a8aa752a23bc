"""Krylov baselines for ``(H + εI) x = b``: conjugate gradients and MINRES on a matvec.

Both start from ``x = 0`` and stop when their recursively updated residual norm is at most
``rtol·‖b‖`` or after ``maxiter`` products. ``iterations`` counts products with the matrix.

* Conjugate gradients (Hestenes–Stiefel) is meant for positive definite matrices. On an
  indefinite one it is still defined while ``pᵀAp ≠ 0`` and is run on regardless; the
  first iteration with ``pᵀAp ≤ 0`` (negative curvature) is recorded.
* MINRES (Paige–Saunders) minimises ``‖b − A x‖`` over the Krylov space by a Lanczos
  process and a QR factorisation of its tridiagonal matrix by Givens rotations; it needs
  symmetry only. With ``Lanczos: A v_k = β_k v_{k−1} + α_k v_k + β_{k+1} v_{k+1}``, the
  ``k``-th column ``(β_k, α_k, β_{k+1})`` of the tridiagonal matrix is rotated by the two
  previous rotations into ``(ε_k, δ_k, γ̄_k)``, a new rotation zeroes ``β_{k+1}``, and
  ``x += τ_k d_k`` with ``d_k = (v_k − δ_k d_{k−1} − ε_k d_{k−2}) / γ_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class KrylovResult:
    x: Tensor
    iterations: int
    converged: bool
    residual_estimate: float
    """The method's own (recursive) relative residual ``‖b − A x‖ / ‖b‖`` at the end."""
    negative_curvature_at: int | None = None
    """CG only: the first iteration with ``pᵀAp ≤ 0``, if any."""
    breakdown: str | None = None


def _check(b: Tensor, rtol: float, maxiter: int) -> None:
    if not isinstance(b, Tensor) or b.dim() != 1:
        raise ValueError(f"b must be a 1-d tensor, got {type(b).__name__} of shape {getattr(b, 'shape', None)}")
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}")


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, *, rtol: float = 1e-8, maxiter: int = 2000) -> KrylovResult:
    """Conjugate gradients for ``A x = b`` with ``A`` symmetric, given as ``apply(v) = A v``."""
    _check(b, rtol, maxiter)
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return KrylovResult(x, 0, True, 0.0)
    r = b.clone()
    p = r.clone()
    rr = b_norm**2
    negative_at = None
    for k in range(1, maxiter + 1):
        Ap = apply(p)
        pAp = float(torch.dot(p, Ap))
        if negative_at is None and pAp <= 0.0:
            negative_at = k
        if pAp == 0.0 or not math.isfinite(pAp):
            return KrylovResult(x, k, False, math.sqrt(rr) / b_norm, negative_at, f"pᵀAp = {pAp} at iteration {k}")
        alpha = rr / pAp
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        rr_new = float(torch.dot(r, r))
        if not math.isfinite(rr_new):
            return KrylovResult(x, k, False, math.inf, negative_at, f"residual overflowed at iteration {k}")
        if math.sqrt(rr_new) <= rtol * b_norm:
            return KrylovResult(x, k, True, math.sqrt(rr_new) / b_norm, negative_at)
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return KrylovResult(x, maxiter, False, math.sqrt(rr) / b_norm, negative_at)


def minres(apply: Callable[[Tensor], Tensor], b: Tensor, *, rtol: float = 1e-8, maxiter: int = 2000) -> KrylovResult:
    """MINRES for ``A x = b`` with ``A`` symmetric (definite or not), given as ``apply(v) = A v``."""
    _check(b, rtol, maxiter)
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return KrylovResult(x, 0, True, 0.0)
    v_prev = torch.zeros_like(b)
    v = b / b_norm
    beta = 0.0  # β_k, which couples v_k to v_{k−1} (none for k = 1)
    c_old, s_old = 1.0, 0.0  # rotation k−2
    c, s = 1.0, 0.0  # rotation k−1
    d_old = torch.zeros_like(b)
    d = torch.zeros_like(b)
    phi_bar = b_norm
    for k in range(1, maxiter + 1):
        w = apply(v)
        if beta != 0.0:
            w.sub_(v_prev, alpha=beta)
        alpha = float(torch.dot(v, w))
        w.sub_(v, alpha=alpha)
        beta_next = float(torch.linalg.vector_norm(w))
        # rotate the new column (β_k, α_k, β_{k+1}) by rotations k−2 and k−1
        epsilon = s_old * beta
        delta_bar = c_old * beta
        delta = c * delta_bar + s * alpha
        gamma_bar = -s * delta_bar + c * alpha
        gamma = math.hypot(gamma_bar, beta_next)
        if gamma == 0.0 or not math.isfinite(gamma):
            return KrylovResult(x, k, False, abs(phi_bar) / b_norm, None, f"γ = {gamma} at iteration {k} (singular matrix)")
        c_new, s_new = gamma_bar / gamma, beta_next / gamma
        tau = c_new * phi_bar
        phi_bar = -s_new * phi_bar
        d_new = (v - delta * d - epsilon * d_old) / gamma
        x.add_(d_new, alpha=tau)
        d_old, d = d, d_new
        c_old, s_old, c, s = c, s, c_new, s_new
        # β_{k+1} = 0 (an invariant subspace) gives s_new = 0, φ̄ = 0: converged here too
        if abs(phi_bar) <= rtol * b_norm:
            return KrylovResult(x, k, True, abs(phi_bar) / b_norm)
        v_prev, v = v, w / beta_next
        beta = beta_next
    return KrylovResult(x, maxiter, False, abs(phi_bar) / b_norm)
