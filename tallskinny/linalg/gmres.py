"""Right-preconditioned GMRES, column-parallel: the inner solver of GMRES-based iterative
refinement (Carson & Higham, SIAM J. Sci. Comput. 40 (2018)).

For ``A d = r`` with an approximate inverse ``M⁻¹`` (a low-precision factorization),
Arnoldi on ``A M⁻¹`` from ``v₁ = r/‖r‖`` gives ``A Z_j = V_{j+1} H̄_j`` with
``Z_j = M⁻¹ V_j``; the iterate ``d_j = Z_j y_j`` minimises ``‖‖r‖e₁ − H̄_j y‖`` over
``y``, the residual ``‖r − A d_j‖`` of the Krylov space. For a linear ``M⁻¹`` in exact
arithmetic the space contains the stationary refinement's ``d = Σ (I − M⁻¹A)ⁱ M⁻¹ r``,
so GMRES's residual is no larger than ``j`` steps of classical refinement, and it still
converges where ``‖I − AM⁻¹‖ ≥ 1`` but the eigenvalues of ``AM⁻¹`` cluster
(Carson–Higham's reason to use it). A rounded float32 solve is not exactly linear; ``Z``
is kept (flexible GMRES's form), so the iterate is the one the residual estimate is of. Each column
has its own Krylov space; the products ``A`` and ``M⁻¹`` are taken on all columns at once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def gmres(
    apply: Callable[[Tensor], Tensor],
    precondition: Callable[[Tensor], Tensor],
    r: Tensor,
    *,
    rtol: float,
    maxiter: int,
    stagnation: int | None = None,
) -> tuple[Tensor, int]:
    """``(d, steps)`` with ``‖r − A d‖ ≤ rtol·‖r‖`` per column of ``r`` (``n × k``) as
    estimated by the Arnoldi recurrence, or after ``maxiter`` steps (one ``apply`` and one
    ``precondition`` of ``n × k`` each), or, with ``stagnation = s``, once ``s`` steps
    did not halve the estimate of a column still above its tolerance (a preconditioner
    too poor to pay; a NaN estimate counts as not halved). Holds ``2·steps + 1`` vectors
    of ``n × k``, made as the steps need them. Classical Gram–Schmidt twice; a column
    whose Krylov space became invariant (``h_{j+1,j} = 0``: its ``d`` is exact) takes zero
    vectors from there on. The small least-squares problems are solved on the host with an
    SVD (``gelsd``), which takes the rank-deficient ``H̄`` of such a column (or of a zero
    column of ``r``) in its stride."""
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    k = r.shape[1]
    beta = r.norm(dim=0)  # k
    live = beta > 0
    V = [torch.where(live, r / torch.where(live, beta, 1.0), 0.0)]  # the Arnoldi basis
    Z: list[Tensor] = []  # M⁻¹ V: the iterate without another preconditioner call
    host = torch.device("cpu")
    Hbar = torch.zeros(k, maxiter + 1, maxiter, dtype=torch.float64, device=host)
    beta_h = beta.to(host, torch.float64)
    e1 = torch.zeros(k, maxiter + 1, dtype=torch.float64, device=host)
    e1[:, 0] = beta_h
    target = rtol * beta_h
    history = [beta_h]
    for j in range(maxiter):
        Z.append(precondition(V[j]))
        w = apply(Z[j])
        h = torch.zeros(j + 1, k, dtype=w.dtype, device=w.device)
        for _ in range(2):  # Kahan: twice is enough
            c = torch.stack([(v * w).sum(dim=0) for v in V])  # (j+1) × k
            for v, cv in zip(V, c):
                w = w - v * cv
            h = h + c
        norm = w.norm(dim=0)
        Hbar[:, : j + 1, j] = h.mT.to(host, torch.float64)
        Hbar[:, j + 1, j] = norm.to(host, torch.float64)
        grows = norm > 0
        V.append(torch.where(grows, w / torch.where(grows, norm, 1.0), 0.0))
        H, rhs = Hbar[:, : j + 2, : j + 1], e1[:, : j + 2].unsqueeze(-1)
        y = torch.linalg.lstsq(H, rhs, driver="gelsd").solution  # k × (j+1) × 1
        estimate = (rhs - H @ y).norm(dim=(1, 2))
        if bool((estimate <= target).all()):
            break
        history.append(estimate)
        if stagnation is not None and j + 1 >= stagnation:
            open_ = ~(estimate <= target)
            if bool((open_ & ~(estimate <= 0.5 * history[-1 - stagnation])).any()):
                break
    coef = y.squeeze(-1).mT.to(r.device, r.dtype)  # (j+1) × k
    d = Z[0] * coef[0]
    for z, cz in zip(Z[1:], coef[1:]):
        d = d + z * cz
    return d, j + 1
