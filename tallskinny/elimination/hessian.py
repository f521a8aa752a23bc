"""Products with the Hessian of the whole chain from its compiled oracles: the HVP sweep,
the gradient, a lower bound of its norm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .algebra import symmetrize
from .compiled import CompiledBlocks, CompiledOracle
from .runs import has_bias


def gradient(blocks: "CompiledBlocks", adjoints: Sequence[Tensor]) -> Tensor:
    """The flat gradient ``(∂loss/∂θ_l = G_lᵀ g_l)_l`` from the adjoints ``g_l`` of the
    blocks' outputs: ``[vec(g xᵀ), g]`` (``vec(g xᵀ)`` without a bias) for a one-sample
    ``nn.Linear`` (its hint, no operators made), the compiled ``Gᵀ`` otherwise."""
    runs, offsets = blocks.run_plan()
    out = adjoints[0].new_empty(offsets[-1])  # written in place, block by block
    i = 0
    while i < len(blocks):
        b, g = blocks[i], adjoints[i]
        if i in runs:  # [vec(g xᵀ), g] of every Linear of the run at once
            end, run = runs[i]
            o = out[offsets[i] : offsets[end]].view(run.J, -1)
            # J × m × 1 (views of out; a buffer without a bias)
            gs = o[:, run.m * run.n :].unsqueeze(-1) if run.bias else o.new_empty(run.J, run.m, 1)
            torch.stack([adjoints[k].reshape(-1, 1) for k in range(i, end, 2)], out=gs)
            torch.bmm(gs, run.x.mT, out=o[:, : run.m * run.n].view(run.J, run.m, run.n))
            i = end
            continue
        part = out[offsets[i] : offsets[i + 1]]
        i += 1
        if not b.p:
            continue
        if b.linear is not None:
            x, g = b.linear[1], g.reshape(-1, 1)
            m, n = g.shape[0], x.shape[0]
            torch.mm(g, x.mT, out=part[: m * n].view(m, n))
            if has_bias(b):
                part[m * n :] = g.reshape(-1)
        else:
            part[:] = b.GT(g.reshape(-1, 1)).reshape(-1)
    return out


def last_blocks_norm_bound(blocks: Sequence[CompiledOracle], loss_hessian: Tensor, depth: int = 4) -> float:
    """A lower bound of ``‖H‖₂`` from the diagonal blocks of the last ``depth`` one-sample
    ``nn.Linear`` blocks (read from their hints; the walk stops at a block without one).

    With ``T_l`` the Hessian of the loss w.r.t. block ``l``'s output at fixed parameters
    (``T ← FᵀTF + E`` back from the loss; an activation's ``F = diag(d)``, ``E = diag(e)``),
    the diagonal block of a Linear is ``H_ll = G_lᵀT_lG_l = T_l ⊗ x̃x̃ᵀ``, of norm
    ``‖T_l‖₂·‖x̃‖²``, and ``‖H‖ ≥ ‖H_ll‖``. A few small products, no HVP."""
    T = loss_hessian
    best, seen = 0.0, 0
    for b in reversed(blocks):
        if b.linear is not None:
            W, x, _ = b.linear
            if T.shape[0] != W.shape[0]:
                break
            sigma_sq = float((x * x).sum()) + float(has_bias(b))  # ‖x̃‖², x̃ = [x; 1] or x
            best = max(best, float(torch.linalg.eigvalsh(symmetrize(T)).abs().max()) * sigma_sq)
            seen += 1
            if seen >= depth:
                break
            T = W.mT @ T @ W
        elif b.diagonal is not None and not b.p:
            d, e = b.diagonal
            if T.shape[0] != d.shape[0]:
                break
            T = T * (d * d.mT)
            if e is not None:
                T.diagonal().add_(e.reshape(-1))
        else:
            break
    return best


def hvp(
    blocks: Sequence[CompiledOracle], loss: CompiledOracle, v: Tensor, into: Tensor | None = None, shift: float = 0.0
) -> Tensor:
    """``H v + shift·v`` for ``v`` of shape ``(P, k)``: a forward sweep of the tangents
    ``y_l = F_l y_{l-1} + G_l v_l`` and a backward sweep of the adjoints
    ``μ_{l-1} = F_lᵀ μ_l + C_lᵀ v_l + E_l y_{l-1}`` (from ``μ_L = E_loss y_L``), giving
    ``(H v)_l = A_l v_l + C_l y_{l-1} + G_lᵀ μ_l`` (the shift is added where each part is
    made: no extra pass over the result)."""
    vs = torch.split(v, [b.p for b in blocks], dim=0)
    n = len(blocks)
    ys: list[Tensor | None] = [None] * n
    y = None  # the tangent; None while it is zero (before the first parameter)
    one = v.shape[1] == 1
    # runs of identical Linear + elementwise pairs, batched (every column at once)
    runs, offsets = blocks.run_plan() if isinstance(blocks, CompiledBlocks) else ({}, None)
    ends = {end - 1: start for start, (end, _) in runs.items()}
    saved: dict = {}
    i = 0
    while i < n:
        b, vl = blocks[i], vs[i]
        ys[i] = y
        if i in runs:
            end, run = runs[i]
            y, saved[i] = run.tangents(y, v[offsets[i] : offsets[end]])
            i = end
            continue
        i += 1
        if y is not None and one and b.TAN is not None:
            y = b.TAN(y, vl)
            continue
        if y is not None:
            y = b.F(y) if b.F is not None else None
        if b.G is not None:
            gv = b.G(vl)
            y = gv if y is None else y + gv
    if y is None:
        return v * shift if into is None else torch.mul(v, shift, out=into)
    mu = loss.E(y) if loss.E is not None else None
    out: list[Tensor] = list(vs)
    # runs write their part in place (into ``into`` where given, a buffer of v's shape
    # that the caller reuses; else a new row-major one whatever v's layout: the runs write
    # contiguous rows, and a column-major buffer would be a copy. Without runs the result
    # is a new tensor)
    result = (into if into is not None else v.new_empty(v.shape)) if runs else None
    i = n
    while i > 0:
        i -= 1
        start = ends.get(i)
        if start is not None:
            run = runs[start][1]
            mu = y.new_zeros(run.m, y.shape[1]) if mu is None else mu
            out[start], mu = run.adjoints(mu, saved[start], out=result[offsets[start] : offsets[i + 1]], shift=shift)
            for k in range(start + 1, i + 1):
                out[k] = None
            i = start
            continue
        b, vl, y_in = blocks[i], vs[i], ys[i]
        if b.p and b.HV is not None and mu is not None and b.A is None and vl.shape[1] == 1:
            out[i] = b.HV(vl, y_in, mu)
        elif b.p:
            hv = b.A(vl) if b.A is not None else None
            if y_in is not None and b.C is not None:
                hv = _add(hv, b.C(y_in))
            if mu is not None and b.GT is not None:
                hv = _add(hv, b.GT(mu))
            out[i] = hv if hv is not None else torch.zeros_like(vl)
        if b.p and shift:
            out[i] = out[i] + shift * vl
        if one and b.ADJ is not None and mu is not None and y_in is not None:
            mu = b.ADJ(mu, y_in, vl)
            continue
        mu_in = None if mu is None or b.FT is None else b.FT(mu)
        if y_in is not None and b.E is not None:
            mu_in = _add(mu_in, b.E(y_in))
        if b.p and b.CT is not None:
            mu_in = _add(mu_in, b.CT(vl))
        mu = mu_in
    if result is None:
        return torch.cat(out, dim=0)
    for i, part in enumerate(out):  # the blocks outside runs
        if part is not None and i not in runs:
            result[offsets[i] : offsets[i + 1]] = part
    return result


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b
