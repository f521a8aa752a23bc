"""Right-preconditioned GMRES, column-parallel: the inner solver of GMRES-based iterative
refinement (Carson & Higham, SIAM J. Sci. Comput. 40 (2018)).

For ``A d = r`` with an approximate inverse ``M⁻¹`` (a low-precision factorization),
Arnoldi on ``A M⁻¹`` from ``v₁ = r/‖r‖`` gives ``A Z_j = V_{j+1} H̄_j`` with
``Z_j = M⁻¹ V_j``; the iterate ``d_j = Z_j y_j`` minimises ``‖‖r‖e₁ − H̄_j y‖`` over
``y``, the residual ``‖r − A d_j‖`` of the Krylov space. The space contains the
stationary refinement's ``d = Σ (I − M⁻¹A)ⁱ M⁻¹ r``, so GMRES's residual is never larger
than ``j`` steps of classical refinement, and it still converges where ``‖I − AM⁻¹‖ ≥ 1``
but the eigenvalues of ``AM⁻¹`` cluster (Carson–Higham's reason to use it). Each column
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
    did not halve the estimate of some column (a preconditioner too poor to pay).
    Classical Gram–Schmidt twice; a column whose Krylov space became invariant
    (``h_{j+1,j} = 0``: its ``d`` is exact) takes zero vectors from there on."""
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    n, k = r.shape
    beta = r.norm(dim=0)  # k
    V = r.new_zeros(maxiter + 1, n, k)  # the Arnoldi basis, one n × k slice a step
    Z = r.new_zeros(maxiter, n, k)  # M⁻¹ V: the iterate without another preconditioner call
    Hbar = torch.zeros(k, maxiter + 1, maxiter, dtype=torch.float64, device=r.device)
    live = beta > 0
    V[0] = torch.where(live, r / torch.where(live, beta, 1.0), 0.0)
    e1 = torch.zeros(k, maxiter + 1, dtype=torch.float64, device=r.device)
    e1[:, 0] = beta.double()
    y = None
    history = [beta.double()]
    for j in range(maxiter):
        Z[j] = precondition(V[j])
        w = apply(Z[j])
        h = torch.zeros(j + 1, k, dtype=w.dtype, device=w.device)
        for _ in range(2):  # Kahan: twice is enough
            c = torch.einsum("jnk,nk->jk", V[: j + 1], w)
            w = w - torch.einsum("jnk,jk->nk", V[: j + 1], c)
            h = h + c
        norm = w.norm(dim=0)
        Hbar[:, : j + 1, j] = h.mT.double()
        Hbar[:, j + 1, j] = norm.double()
        grows = norm > 0
        V[j + 1] = torch.where(grows, w / torch.where(grows, norm, 1.0), 0.0)
        H, rhs = Hbar[:, : j + 2, : j + 1], e1[:, : j + 2]
        y = torch.linalg.lstsq(H, rhs.unsqueeze(-1)).solution  # k × (j+1) × 1
        estimate = (rhs.unsqueeze(-1) - H @ y).norm(dim=(1, 2))
        if bool((estimate <= rtol * beta.double()).all()):
            break
        history.append(estimate)
        if stagnation is not None and j + 1 >= stagnation and bool((estimate > 0.5 * history[-1 - stagnation]).any()):
            break
    steps = j + 1
    coef = y.squeeze(-1).mT.to(r.dtype)  # (j+1) × k
    return torch.einsum("jnk,jk->nk", Z[:steps], coef), steps
