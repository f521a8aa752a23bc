"""The structured stage for blocks that are affine in their parameters (Linear-type).

Such a block's oracle says, with :mod:`tallskinny.linalg` operators,

    G = P_out · (I_m ⊗ X̃) · P_θ        C = P_θᵀ · (Γ ⊗ Ẽ)        A = 0

that is: with ``Θ̃ = P_θ θ`` read as an ``m × q`` matrix, the output is
``vec(Θ̃ X̃ᵀ)`` (``X̃`` the ``R × q`` matrix of the rows the parameters act on, e.g.
the samples' inputs with a column of ones for the bias), reordered by ``P_out``; and
``θᵀ C y = ⟨Θ̃, Γ Y Ẽᵀ⟩`` for an input perturbation ``Y`` (``R × n``).

With the thin SVD ``X̃ = U Σ Vᵀ`` (rank ``r``, computed once), ``Θ̃ = Z Vᵀ + Θ̃_⊥`` splits
parameter space into the span ``Z`` (``m·r`` numbers, at most the block's output size)
and its complement, on which ``G`` vanishes exactly and ``Q_θθ = εI``. The complement is
eliminated in closed form (it adds ``−(ΓᵀΓ ⊗ P̄)/ε`` to the value Hessian, where
``P̄ = Ẽᵀ(I − VVᵀ)Ẽ``); the span is an ordinary dense stage of size ``m·r``. Nothing of
size ``p × p`` or ``p × a`` is formed.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .blocks.protocol import Oracle
from .linalg import Dense, Identity, Inertia, ScaledIdentity, Zero
from .linalg.kronecker import Kronecker, Permutation, Product, kron, transpose_permutation


def affine_parts(o: Oracle):
    """``(p_out, X̃, p_θ, Γ, Ẽ)`` if the oracle has the affine structure, else ``None``
    (``Γ``, ``Ẽ`` are ``None`` when ``C = 0``)."""
    G = o.G
    if not isinstance(o.A, Zero) or not isinstance(G, Product) or len(G.factors) != 3:
        return None
    p_out, kron, p_theta = G.factors
    if not (
        isinstance(p_out, Permutation)
        and isinstance(p_theta, Permutation)
        and isinstance(kron, Kronecker)
        and isinstance(kron.left, ScaledIdentity)
        and kron.left.scale == 1.0
        and isinstance(kron.right, Dense)
    ):
        return None
    if isinstance(o.C, Zero):
        return p_out.index, kron.right.matrix, p_theta, None, None
    C = o.C
    if not (
        isinstance(C, Product)
        and len(C.factors) == 2
        and isinstance(C.factors[0], Permutation)
        and (C.factors[0] is p_theta.T or torch.equal(C.factors[0].index, p_theta.T.index))
        and isinstance(C.factors[1], Kronecker)
        and isinstance(C.factors[1].left, Dense)
        and isinstance(C.factors[1].right, Dense)
    ):
        return None
    return p_out.index, kron.right.matrix, p_theta, C.factors[1].left.matrix, C.factors[1].right.matrix


def _transposed_order(p_theta: Permutation, m: int, q: int) -> tuple[Tensor, Tensor]:
    """The gather indices of ``vec(Θ̃ᵀ)`` from θ and their inverse (kept on the permutation,
    which blocks make once per shape)."""
    cached = p_theta.__dict__.get("_transposed_order")
    if cached is None:
        order = p_theta.index.reshape(m, q).T.reshape(-1)
        cached = (order, torch.argsort(order))
        p_theta.__dict__["_transposed_order"] = cached
    return cached


@functools.lru_cache(maxsize=64)
def _eye(rows: int, cols: int, dtype, device) -> Tensor:
    return torch.eye(rows, cols, dtype=dtype, device=device)


class AffineStage:
    """A block affine in its parameters: exact complement ⊕ a dense stage on the span."""

    def __init__(self, oracle: Oracle, parts, inner_stage):
        p_out, X, p_theta, Gam, Et = parts
        R, q = X.shape
        m = oracle.G.shape[0] // R
        self.p = oracle.G.shape[1]
        self.F = oracle.F
        self.m, self.q = m, q
        # Θ̃ is handled transposed, as a q × (m·k) matrix, so that every product with V, Ẽ
        # is one 2-D matrix product: T = (P_θ' b).reshape(q, m·k) with P_θ' = P_θ transposed
        self.order, self.order_inv = _transposed_order(p_theta, m, q)
        U, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
        tol = max(R, q) * torch.finfo(X.dtype).eps * (float(sigma[0]) if sigma.numel() else 0.0)
        r = int((sigma > tol).sum())
        self.r = r
        self.V = Vh[:r].mT  # q × r
        self.Vt = self.V.mT
        XV = U[:, :r] * sigma[:r]  # R × r
        # the span coordinates ζ = vec(Zᵀ) (r × m, i.e. ordered (i, k)), Θ̃ = Z Vᵀ
        span_order = transpose_permutation(m, r, device=X.device)  # (i, k) → (k, i)
        if R == 1:  # tiny: one dense matrix is cheapest
            GV = Dense(kron(torch.eye(m, dtype=X.dtype, device=X.device), XV)[p_out][:, span_order])
        else:  # G V = P_out (I_m ⊗ X̃V) Π: products cost O(a·R·r) instead of O(a²·m·r)
            GV = Product(
                Permutation(p_out, dtype=X.dtype),
                Kronecker(Identity(m, dtype=X.dtype, device=X.device), Dense(XV)),
                Permutation(transpose_permutation(r, m, device=X.device), dtype=X.dtype),  # ζ(i,k) → (k,i)
            )
        self.Gam, self.Et = Gam, Et
        # Ẽ = [I; 0] (a Linear layer's input padded by the bias column): slicing suffices
        self.pad = Et is not None and Et.shape[0] > Et.shape[1] and torch.equal(Et, _eye(*Et.shape, Et.dtype, Et.device))
        a_in = oracle.F.shape[1]
        if Gam is None:
            C_r = Zero(m * r, a_in, dtype=X.dtype, device=X.device)
            self.CtC = None
        else:
            C_r = Dense(kron(Gam, self.V.mT @ Et)[span_order])  # m·r × a_in
            P_bar = Et.mT @ Et - (Et.mT @ self.V) @ (self.V.mT @ Et)
            self.CtC = kron(Gam.mT @ Gam, P_bar)
            self.CtC_max = float(self.CtC.abs().max()) if self.CtC.numel() else 0.0
        self.n_perp = m * (q - r)
        reduced = Oracle(
            G=GV,
            F=oracle.F,
            A=Zero(m * r, m * r, dtype=X.dtype, device=X.device),
            C=C_r,
            E=oracle.E,
        )
        self.inner = inner_stage(reduced)

    # -- coordinates: Θ̃ᵀ as a q × (m·k) matrix ------------------------------------------------
    def _tilde(self, b: Tensor) -> Tensor:
        return b[self.order].reshape(self.q, -1)

    def _untilde(self, T: Tensor, k: int) -> Tensor:
        return T.reshape(self.q * self.m, k)[self.order_inv]

    def _c_perp(self, y: Tensor) -> Tensor:
        """``(C_⊥ y)ᵀ = (I − VVᵀ) Ẽ Yᵀ Γᵀ`` as a ``q × (m·k)`` matrix."""
        R, n, k = self.Gam.shape[1], self.Et.shape[1], y.shape[1]
        M = (self.Gam @ y.reshape(R, n * k)).reshape(self.m, n, k).transpose(0, 1).reshape(n, -1)
        M = torch.cat((M, M.new_zeros(self.q - n, M.shape[1]))) if self.pad else self.Et @ M
        return M - self.V @ (self.Vt @ M)

    def _c_t(self, T: Tensor, k: int) -> Tensor:
        """``Cᵀ`` applied to a ``q × (m·k)`` matrix ``Θ̃ᵀ``: ``Γᵀ Θ̃ Ẽ``, flattened ``(R·n, k)``."""
        n = self.Et.shape[1]
        M = T[:n] if self.pad else self.Et.mT @ T  # n × (m·k)
        M = M.reshape(n, self.m, k).transpose(0, 1).reshape(self.m, n * k)
        return (self.Gam.mT @ M).reshape(-1, k)

    # -- elimination ------------------------------------------------------------------------
    def eliminate(self, S: Tensor, damping: float, index: int):
        S_new, inner = self.inner.eliminate(S, damping, index)
        amplification = inner.amplification if inner is not None else 0.0
        if self.n_perp:
            if damping == 0.0:  # Q_θθ = 0 on the complement
                from .elimination import _raise_if_null_directions, _StageSingular

                _raise_if_null_directions(self.CtC, index)
                raise _StageSingular(index)
            if self.CtC is not None:
                from .elimination import _amplification

                amplification = max(amplification, _amplification(self.CtC_max, damping, S_new))
                S_new = S_new - self.CtC / damping
        record = _AffineStageFactor(self, inner, damping)
        record.amplification = amplification
        return S_new, record


class _AffineStageFactor:
    __slots__ = ("stage", "inner", "damping", "amplification")

    def __init__(self, stage, inner, damping):
        self.stage, self.inner, self.damping = stage, inner, damping

    @property
    def inertia(self) -> Inertia:
        """The span's inertia, and ``ε > 0`` on each of the ``n_⊥`` complement directions."""
        inner = self.inner.inertia if self.inner is not None else Inertia(0, 0, 0)
        return Inertia(inner.positive + self.stage.n_perp, inner.negative, 0)

    @property
    def logdet(self) -> Tensor:
        n = self.stage.n_perp
        extra = n * math.log(self.damping) if n else 0.0
        inner = self.inner.logdet if self.inner is not None else torch.zeros((), dtype=torch.float64)
        return inner + extra

    def backward(self, t: Tensor | None, b: Tensor):
        st = self.stage
        k = b.shape[1]
        T = st._tilde(b)  # q × (m·k)
        Zb = st.Vt @ T  # r × (m·k): the span part, ordered (i, k)
        b_perp = T - st.V @ Zb if st.n_perp else None
        if self.inner is not None:
            u, t_new = self.inner.backward(t, Zb.reshape(-1, k))
        else:
            u, t_new = None, None if t is None else st.F.T._matmat(t)
        if b_perp is not None and st.Gam is not None:
            extra = st._c_t(b_perp, k) / self.damping  # −C_⊥ᵀ u_⊥ with u_⊥ = −b_⊥/ε
            t_new = extra if t_new is None else t_new + extra
        return (u, b_perp, k), t_new

    def forward(self, y: Tensor | None, u):
        st = self.stage
        u_inner, b_perp, k = u
        if self.inner is not None:
            theta_z, y_new = self.inner.forward(y, u_inner)
            T = st.V @ theta_z.reshape(st.r, -1)
        else:
            T, y_new = None, None if y is None else st.F._matmat(y)
        if b_perp is not None:
            perp = b_perp if y is None or st.Gam is None else b_perp - st._c_perp(y)
            perp = perp / self.damping
            T = perp if T is None else T + perp
        return st._untilde(T, k), y_new
