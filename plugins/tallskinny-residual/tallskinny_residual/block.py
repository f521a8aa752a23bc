"""The block of a :class:`~tallskinny_residual.Residual` unit, composed from its inner blocks.

The unit is ``z_out = s(z; θ_s) + u_K`` with ``u_0 = z``, ``u_i = f_i(u_{i−1}; θ_i)``
(``i = 1..K``, the inner blocks) and ``s`` the shortcut (identity by default). Each
inner block and the shortcut give their own oracle ``(G_i, F_i, A_i, C_i, E_i)`` at
their own point, contracted with their own adjoint: ``g_K = g`` and
``g_{i−1} = F_iᵀ g_i`` (backpropagation inside the unit), ``g`` for the shortcut.

Write ``x = (θ, z)`` for the unit's variables (``θ = (θ_1, …, θ_K, θ_s)``), ``S_i`` for
the selection of ``θ_i`` and ``Ξ_i = ∂u_i/∂x = [Ξ_i^θ | Ξ_i^z]`` for the tangent map,
propagated forwards by the chain rule:

    Ξ_0 = [0 | I],        Ξ_i = F_i Ξ_{i−1} + G_i S_i.

First order: ``G = Ξ_K^θ + G_s S_s`` and ``F = Ξ_K^z + F_s``.
Second order: the Hessian of ``⟨g, z_out⟩`` in ``x`` is the sum over the blocks of
their second derivatives pulled back through their inputs ``(θ_i, u_{i−1})``,
``W_i = [S_i; Ξ_{i−1}]``:

    [[A, C], [Cᵀ, E]] = Σ_i W_iᵀ [[A_i, C_i], [C_iᵀ, E_i]] W_i  +  (the shortcut's at (θ_s, z)),

that is, block by block,

    A = Σ_i S_iᵀA_iS_i + S_iᵀC_iΞ_{i−1}^θ + (S_iᵀC_iΞ_{i−1}^θ)ᵀ + Ξ_{i−1}^θᵀ E_i Ξ_{i−1}^θ  + S_sᵀA_sS_s
    C = Σ_i S_iᵀC_iΞ_{i−1}^z + Ξ_{i−1}^θᵀ E_i Ξ_{i−1}^z                               + S_sᵀC_s
    E = Σ_i Ξ_{i−1}^zᵀ E_i Ξ_{i−1}^z                                                   + E_s

(the first-order terms of the inner blocks enter only through ``Ξ`` and the adjoints
``g_i``). Every product is taken with the inner blocks' operators, so their structure
is used; the unit's oracle is dense except where a field is exactly zero (then
``Zero``) or the unit's only parameters sit in its last inner block (then ``G`` is that
block's ``G`` operator, e.g. the affine structure of an ``nn.Linear``). ``A`` is
collected as low-rank terms ``U_j M_j U_jᵀ`` and given as a ``LowRank`` where their
total rank is below ``p`` (see :func:`_low_rank`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from tallskinny.blocks import Block, Oracle, block_for
from tallskinny.blocks.checks import check_adjoint, check_finite, check_input, check_params
from tallskinny.linalg import Dense, LinearOperator, LowRank, Zero
from tallskinny.linalg.kronecker import Kronecker, Product

from .module import Residual

__all__ = ["ResidualBlock"]


class ResidualBlock(Block):
    """Analytic block of :class:`Residual`: the inner blocks' oracles composed by the chain rule."""

    module: Residual

    def __init__(self, module: Residual):
        super().__init__(module)
        self.inner_blocks = [block_for(m) for m in module.inner]
        self.shortcut_block = block_for(module.shortcut)
        own = self.parameters()
        composed = [p for b in [*self.inner_blocks, self.shortcut_block] for p in b.parameters()]
        if len(own) != len(composed) or any(p is not q for p, q in zip(own, composed)):
            raise ValueError(
                "Residual: the inner modules and the shortcut must not share parameters (the same module or "
                "parameter used twice); the blocks' parameters do not line up with the module's"
            )
        self._counts = [len(b.parameters()) for b in [*self.inner_blocks, self.shortcut_block]]

    # -- evaluation -------------------------------------------------------------------------
    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        groups = self._groups(z, params, "forward")
        u = z
        for block, ps in zip(self.inner_blocks, groups):
            u = block.forward(u, ps)
        s = self.shortcut_block.forward(z, groups[-1])
        self._check_sum(s, u, "forward")
        return s + u

    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        where = self._where("oracle")
        groups = [[t.detach() for t in ps] for ps in self._groups(z, params, "oracle")]
        z = z.detach()
        check_finite(z, "z", where)
        us = [z]
        with torch.no_grad():
            for block, ps in zip(self.inner_blocks, groups):
                us.append(block.forward(us[-1], ps))
            s = self.shortcut_block.forward(z, groups[-1])
        self._check_sum(s, us[-1], "oracle")
        g = check_adjoint(g, s.shape, z, where).detach()

        oracles: list[Oracle] = [None] * len(self.inner_blocks)  # type: ignore[list-item]
        g_i = g
        for i in reversed(range(len(self.inner_blocks))):
            oracles[i] = self.inner_blocks[i].oracle(us[i], groups[i], g_i, second_order=second_order)
            g_i = (oracles[i].F.T @ g_i.reshape(-1)).reshape(us[i].shape)
        shortcut = self.shortcut_block.oracle(z, groups[-1], g, second_order=second_order)
        return compose(oracles + [shortcut], [sum(t.numel() for t in ps) for ps in groups], z, second_order)

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """The unit's oracle is dense: ``G`` (``a_out × p``), ``F`` (``a_out × a_in``), ``C``
        (``p × a_in``), ``E`` (``a_in²``) and ``A = U M Uᵀ`` with ``k`` up to one column per
        inner activation (``p·k + k²``, or ``p²`` dense), kept; it is built from the tangent
        maps ``Ξ`` (``a × p``) of its ``K`` inner blocks and the factors of ``A``, taken as
        ``5·a·p + 2·p·k`` of scratch (:class:`~tallskinny.blocks.protocol.OracleMemory`)."""
        p = sum(t.numel() for t in self.parameters())
        a_in, a_out = math.prod(z_in), math.prod(z_out)
        a = max(a_in, a_out)
        k = len(self.inner_blocks) * a if second_order else 0
        A = (p * k + k * k if k < p else p * p) if k else 0
        kept = a_out * p + a_out * a_in + (p * a_in + a_in * a_in if second_order else 0) + A
        return kept * itemsize, (5 * a * p + 2 * p * min(k, p) + 2 * a * a) * itemsize

    # -- helpers ----------------------------------------------------------------------------
    def _groups(self, z, params, method: str) -> list[list[Tensor]]:
        where = self._where(method)
        check_input(z, where)
        params = check_params(self.parameters(), params, z, where)
        out, k = [], 0
        for n in self._counts:
            out.append(params[k:k + n])
            k += n
        return out

    def _check_sum(self, s: Tensor, u: Tensor, method: str) -> None:
        if s.shape != u.shape:
            raise ValueError(
                f"{self._where(method)}: the shortcut's output has shape {tuple(s.shape)} but the inner "
                f"modules' output has shape {tuple(u.shape)}; they must agree to be added"
            )


def compose(oracles: Sequence[Oracle], sizes: Sequence[int], z: Tensor, second_order: bool) -> Oracle:
    """The unit's oracle from the inner blocks' oracles (all but the last) and the
    shortcut's (the last), whose parameters have ``sizes`` entries (see the module docstring)."""
    *inner, short = oracles
    p, a_in = sum(sizes), z.numel()
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    kw = dict(dtype=z.dtype, device=z.device)
    C = E = None  # dense accumulators, None while exactly zero
    A_U: list[Tensor] = []  # A = Σ U_j M_j U_jᵀ: the columns U_j (p × k_j) …
    A_M: list[Tensor] = []  # … and the k_j × k_j middles (see _low_rank)
    C_op: LinearOperator | None = None  # C kept structured (see _structured_c), instead of C
    Xz: Tensor | None = None  # Ξ^z, None for the identity
    Xt: Tensor | None = None  # Ξ^θ, None while exactly zero

    def add(acc, value):
        return value if acc is None else acc + value

    # parameters only in the last inner block: M_K = I, so G is that block's own operator
    # (its structure kept, e.g. the affine form of nn.Linear) and Ξ_K^θ is not needed
    own_G = [i for i, n in enumerate(sizes) if n] == [len(inner) - 1]
    for i, o in enumerate(inner):
        lo, hi = offsets[i], offsets[i + 1]
        if second_order:
            if not isinstance(o.E, Zero):
                EXz = o.E.to_dense() if Xz is None else o.E @ Xz
                E = add(E, EXz if Xz is None else Xz.mT @ EXz)
                if Xt is not None:
                    C = add(C, Xt.mT @ EXz)
                    A_U.append(Xt.mT)  # Ξ^θᵀ E_i Ξ^θ
                    A_M.append(o.E.to_dense())
            if hi > lo and not isinstance(o.C, Zero):
                if own_G and C is None and lo == 0 and hi == p:
                    C_op = _structured_c(o.C, Xz)
                if C_op is None:
                    CXz = o.C.to_dense() if Xz is None else o.C @ Xz
                    C = add(C, _rows(CXz, lo, p))
                if Xt is not None:
                    # S_iᵀC_iΞ^θ + its transpose = [P, Ξ^θᵀ] [[0, I], [I, 0]] [P, Ξ^θᵀ]ᵀ
                    P_i = _rows(o.C.to_dense(), lo, p)
                    n = P_i.shape[1]
                    A_U.append(torch.cat((P_i, Xt.mT), dim=1))
                    swap = torch.zeros(2 * n, 2 * n, **kw)
                    swap[:n, n:] = swap[n:, :n] = torch.eye(n, **kw)
                    A_M.append(swap)
            if hi > lo and not isinstance(o.A, Zero):
                A_U.append(_rows(torch.eye(hi - lo, **kw), lo, p))  # S_iᵀ A_i S_i
                A_M.append(o.A.to_dense())
        Xz = o.F.to_dense() if Xz is None else o.F @ Xz
        Xt = None if Xt is None else o.F @ Xt
        if hi > lo and not own_G:
            Xt = add(Xt, _columns(o.G.to_dense(), lo, p))
    lo = offsets[-2]
    if second_order:
        if not isinstance(short.E, Zero):
            E = add(E, short.E.to_dense())
        if p > lo and not isinstance(short.C, Zero):
            C = add(C, _rows(short.C.to_dense(), lo, p))
        if p > lo and not isinstance(short.A, Zero):
            A_U.append(_rows(torch.eye(p - lo, **kw), lo, p))
            A_M.append(short.A.to_dense())
    F = Dense(Xz + short.F.to_dense())
    a_out = F.shape[0]

    if own_G:
        G: LinearOperator = inner[-1].G
    elif p == 0:
        G = Zero(a_out, 0, **kw)
    else:
        G = Dense(add(Xt, _columns(short.G.to_dense(), lo, p)) if p > lo else Xt)
    return Oracle(
        G=G,
        F=F,
        A=_low_rank(A_U, A_M, p, kw),
        C=C_op if C_op is not None else Zero(p, a_in, **kw) if C is None else Dense(C),
        E=Zero(a_in, a_in, **kw) if E is None else Dense(0.5 * (E + E.mT), symmetric=True),
    )


def _low_rank(U_parts: Sequence[Tensor], M_parts: Sequence[Tensor], p: int, kw) -> LinearOperator:
    """``A = Σ_j U_j M_j U_jᵀ``: a :class:`~tallskinny.linalg.LowRank` where its rank
    bound ``k = Σ k_j`` is below ``p`` (the solver then works on ``k`` directions, not on
    all ``p``: a unit with parameters in several inner blocks has ``k ≈ 3·width``), else
    dense; ``Zero`` without terms."""
    if not U_parts:
        return Zero(p, p, **kw)
    U = torch.cat(list(U_parts), dim=1)
    M = torch.block_diag(*[0.5 * (M + M.mT) for M in M_parts])
    if U.shape[1] < p:
        return LowRank(U, M)
    A = U @ M @ U.mT
    return Dense(0.5 * (A + A.mT), symmetric=True)


def _structured_c(C: LinearOperator, Xz: Tensor | None) -> LinearOperator | None:
    """``C Ξ`` with ``C = P (Γ ⊗ Ẽ)`` at one sample (``Γ`` a column) as ``P (Γ ⊗ ẼΞ)``: the
    affine form the solver recognises, for the one block with parameters (``None`` where
    ``C`` has another form; then it is formed densely)."""
    if not (isinstance(C, Product) and len(C.factors) == 2 and isinstance(C.factors[1], Kronecker)):
        return None
    K = C.factors[1]
    if not (isinstance(K.left, Dense) and isinstance(K.right, Dense) and K.left.shape[1] == 1):
        return None
    if Xz is None:
        return C
    if K.right.shape[1] != Xz.shape[0]:
        return None
    return Product(C.factors[0], Kronecker(K.left, Dense(K.right.matrix @ Xz)))


def _rows(M: Tensor, lo: int, p: int) -> Tensor:
    """``M`` placed in rows ``lo…`` of a ``p × cols`` zero matrix (``M`` itself if it fills it)."""
    if lo == 0 and M.shape[0] == p:
        return M
    out = M.new_zeros(p, M.shape[1])
    out[lo:lo + M.shape[0]] = M
    return out


def _columns(M: Tensor, lo: int, p: int) -> Tensor:
    if lo == 0 and M.shape[1] == p:
        return M
    out = M.new_zeros(M.shape[0], p)
    out[:, lo:lo + M.shape[1]] = M
    return out
