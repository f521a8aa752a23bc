"""Products with the oracles, compiled once per curvature into plain tensor functions.

Every product of the Hessian with a vector (an HVP, the residual of a refinement step)
applies ``F, G, C, A, E`` and their transposes of every block. Through the generic
:mod:`tallskinny.linalg` operators that is a chain of Python calls per product (a
``Product`` of permutations around a ``Kronecker`` of ``Dense`` factors); here each
operator is turned, once, into the few tensor operations its structure needs:

* ``Zero`` → nothing, ``Diagonal`` → one broadcast multiply, ``Dense`` → one matmul;
* ``I_R ⊗ W`` (a Linear layer's ``F``) → one (batched) matmul;
* the affine ``G = P_out (I_m ⊗ X̃) P_θ`` and ``C = P_θᵀ (Γ ⊗ Ẽ)`` → one gather and
  one or two matmuls on ``Θ̃ᵀ`` read as a ``q × (m·k)`` matrix;
* anything else → the operator's own ``matmat``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..blocks.linear import WeightBiasOrder
from ..blocks.protocol import DeferredOracle, Oracle
from ..linalg import Dense, Diagonal, LinearOperator, ScaledIdentity, Zero
from ..linalg.kronecker import identity_kronecker_factor
from .runs import HVPRun, find_runs
from .structure import affine_parts, padded_identity, samples_first, transposed_order


Apply = Callable[[Tensor], Tensor]


def compile_operator(op: LinearOperator) -> Apply | None:
    """``x ↦ op x`` for ``(n, k)`` tensors, or ``None`` for a zero operator."""
    if isinstance(op, Zero):
        return None
    if isinstance(op, Diagonal):
        d = op.diagonal.unsqueeze(-1)
        return lambda x: d * x
    if isinstance(op, ScaledIdentity):
        scale = op.scale
        return (lambda x: x) if scale == 1.0 else (lambda x: scale * x)
    if isinstance(op, Dense):
        M = op.matrix
        return lambda x: M @ x
    W = identity_kronecker_factor(op)
    if W is not None:
        R = op.shape[0] // W.shape[0]
        if R == 1:
            return lambda x: W @ x
        n, m = W.shape[1], W.shape[0]
        Wt = W.mT

        def apply(x: Tensor) -> Tensor:  # one vector: (X Wᵀ) for the R × n matrix X, one mm
            if x.shape[1] == 1:
                return (x.reshape(R, n) @ Wt).reshape(R * m, 1)
            return (W @ x.reshape(R, n, -1)).reshape(R * m, -1)

        return apply
    return op.matmat


class CompiledOracle:
    """The products of one block's oracle: ``F, Fᵀ, G, Gᵀ, C, Cᵀ, A, E`` (``None`` = zero)."""

    __slots__ = (
        "p", "F", "FT", "G", "GT", "GT_samples", "C", "CT", "A", "E", "HV", "TAN", "ADJ", "parts", "sample_major", "linear",
        "diagonal", "_oracle", "_source",
    )

    def __init__(self, o: Oracle):
        # what the batched runs read, made at once: ``(W, x, g)`` of an nn.Linear at one
        # sample (θ = [vec(W), b] or vec(W), told apart by p; g None where C = 0) and ``(d, e)`` of F = diag(d),
        # E = diag(e) (e None: E = 0) of a parameter-free elementwise block
        # (tallskinny.elimination.runs); from a DeferredOracle's hints where it has them
        # (its operators stay unmade), else read off the operators
        self._source = o
        if isinstance(o, DeferredOracle):
            self.p = o.sizes[2]
            self.linear, self.diagonal = o.linear, o.diagonal
        else:
            self.p = o.G.shape[1]
            self.linear = _one_sample_linear(o, self.parts) if self.sample_major and isinstance(o.E, Zero) else None
            self.diagonal = None
            if self.p == 0 and isinstance(o.F, Diagonal) and isinstance(o.E, (Diagonal, Zero)):
                e = o.E.diagonal.unsqueeze(-1) if isinstance(o.E, Diagonal) else None
                self.diagonal = (o.F.diagonal.unsqueeze(-1), e)
        # the products themselves, and the affine structure the stages read
        # (affine.affine_parts), are made on first use: blocks inside batched runs never
        # need them
        self._oracle = o

    def __getattr__(self, name: str):
        # called only for an attribute not made yet (an unset slot)
        if name == "parts":
            o = object.__getattribute__(self, "_source")
            self.parts = affine_parts(o) if self.p else None
            return self.parts
        if name == "sample_major":
            parts = self.parts
            self.sample_major = parts is not None and samples_first(self._source, parts)
            return self.sample_major
        o = object.__getattribute__(self, "_oracle")
        if o is None or name not in _PRODUCTS:
            raise AttributeError(name)
        self._oracle = None
        self._compile(o)
        return getattr(self, name)

    def _compile(self, o: Oracle) -> None:
        # fused one-vector steps, where the structure allows (None: use the products)
        self.HV = None  # (v, y_in, μ) ↦ C y_in + Gᵀμ
        self.TAN = None  # (y_in, v) ↦ F y_in + G v
        self.ADJ = None  # (μ, y_in, v) ↦ Fᵀμ + E y_in + Cᵀv
        self.F, self.FT = compile_operator(o.F), compile_operator(o.F.T)
        self.A, self.E = compile_operator(o.A), compile_operator(o.E)
        self.GT_samples = None
        if self.diagonal is not None and self.diagonal[1] is not None:
            d, e = self.diagonal
            self.ADJ = lambda mu, y, v: torch.addcmul(d * mu, e, y)
        if self.sample_major:
            self._compile_affine(o, self.parts)
        else:
            self.G, self.GT = compile_operator(o.G), compile_operator(o.G.T)
            self.C, self.CT = compile_operator(o.C), compile_operator(o.C.T)

    def _compile_affine(self, o: Oracle, parts) -> None:
        """``G v = vec(X̃ Θ̃_vᵀ)``, ``Gᵀμ = X̃ᵀ M``, ``C y = vec(Γ Y Ẽᵀ)``, ``Cᵀv = vec(Γᵀ Θ̃_v Ẽ)``."""
        _, X, p_theta, Gam, Et, C_general = parts
        R, q = X.shape
        m = o.G.shape[0] // R
        order, order_inv = transposed_order(p_theta, m, q)
        Xt = X.mT

        def G(v: Tensor) -> Tensor:
            k = v.shape[1]
            return (X @ v.index_select(0, order).reshape(q, m * k)).reshape(R * m, k)

        def GT(mu: Tensor) -> Tensor:
            k = mu.shape[1]
            return (Xt @ mu.reshape(R, m * k)).reshape(q * m, k).index_select(0, order_inv)

        def GT_samples(mu: Tensor) -> Tensor:  # [Gᵀ(e_s ⊗ μ_s[:, j])]_(s, j) = [x̃_s ⊗ μ_s[:, j]]
            N, _, k = mu.shape
            return torch.einsum("sq,smk->qmsk", X, mu).reshape(q * m, N * k).index_select(0, order_inv)

        self.G, self.GT = G, GT
        self.GT_samples = GT_samples
        if C_general is not None:
            self.C, self.CT = compile_operator(o.C), compile_operator(o.C.T)
            return
        if Gam is None:
            self.C = self.CT = None
            self._compile_weight_bias_if_linear(o, parts)
            return
        n = Et.shape[1]
        Gt, Ett = Gam.mT, Et.mT
        inverse = p_theta.T.index  # θ = vec(Θ̃)[inverse]

        def C(y: Tensor) -> Tensor:  # vec(Θ̃) = vec(Γ Y Ẽᵀ), read through P_θᵀ
            k = y.shape[1]
            M = (Gam @ y.reshape(R, n * k)).reshape(m, n, k).permute(2, 0, 1)  # (k, i, j)
            M = (M @ Ett).permute(1, 2, 0)  # (i, c, k) = Γ Y Ẽᵀ
            return M.reshape(m * q, k).index_select(0, inverse)

        def CT(v: Tensor) -> Tensor:
            k = v.shape[1]
            T = v.index_select(0, order).reshape(q, m, k)  # Θ̃ᵀ: (c, i, k)
            M = (Ett @ T.reshape(q, m * k)).reshape(n, m, k).transpose(0, 1)  # (Θ̃Ẽ): (i, j, k)
            return (Gt @ M.reshape(m, n * k)).reshape(R * n, k)

        self.C, self.CT = C, CT
        self._compile_weight_bias_if_linear(o, parts)

    def _compile_weight_bias_if_linear(self, o: Oracle, parts) -> None:
        layout = _weight_layout(o, parts)
        if layout is not None:
            self._compile_weight_bias(parts[1], o.G.shape[0] // parts[1].shape[0], layout[0], parts[3], layout[1])

    def _compile_weight_bias(self, X: Tensor, m: int, nw: int, Gam: Tensor | None, W: Tensor | None) -> None:
        """θ = ``[vec(W), b]`` with ``Θ̃ = [W | b]`` (``nn.Linear``'s layout) and, if ``C ≠ 0``,
        ``Ẽ = [I; 0]``: the products with one vector read ``W`` and ``b`` as views of θ,
        without gathers; several vectors at once go through the general closures. Where
        ``F = I_R ⊗ W`` too (``W`` given), the sweeps' steps of one vector are fused
        (``TAN``, ``ADJ``)."""
        R, q = X.shape
        mw, bias = m * nw, q > nw
        Xw = X[:, :nw]
        G_any, GT_any, C_any, CT_any = self.G, self.GT, self.C, self.CT

        def gv(v: Tensor) -> Tensor:  # X W_vᵀ + b_v, R × m
            Wv = v[:mw].view(m, nw)
            return torch.addmm(v[mw:].view(1, m), Xw, Wv.mT) if bias else Xw @ Wv.mT

        def G(v: Tensor) -> Tensor:
            return G_any(v) if v.shape[1] != 1 else gv(v).view(R * m, 1)

        def GT(mu: Tensor) -> Tensor:  # [vec(Mᵀ X), Mᵀ1]
            if mu.shape[1] != 1:
                return GT_any(mu)
            M = mu.view(R, m)
            gW = (M.mT @ Xw).view(-1)
            return (torch.cat((gW, M.sum(0))) if bias else gW).view(-1, 1)

        self.G, self.GT = G, GT
        p = mw + m * bias

        def HV(v: Tensor, y: Tensor | None, mu: Tensor) -> Tensor:  # [vec(Mᵀ X_w + Γ Y), Mᵀ1]
            out = v.new_empty(p, 1)
            M = mu.view(R, m)
            out_W = out[:mw].view(m, nw)
            if y is None or Gam is None:
                torch.mm(M.mT, Xw, out=out_W)
            else:
                torch.addmm(Gam @ y.view(R, nw), M.mT, Xw, out=out_W)
            if bias:
                torch.sum(M, 0, out=out[mw:].view(m))
            return out

        self.HV = HV
        fuse = W is not None  # F = I_R ⊗ W
        if fuse:

            def TAN(y: Tensor, v: Tensor) -> Tensor:  # Y Wᵀ + X W_vᵀ + b_v
                return torch.addmm(gv(v), y.view(R, nw), W.mT).view(R * m, 1)

            self.TAN = TAN
        if Gam is None:
            return
        zeros = X.new_zeros(m) if bias else None
        Gt = Gam.mT
        if fuse:

            def ADJ(mu: Tensor, y: Tensor | None, v: Tensor) -> Tensor:  # M W + Γᵀ W_v (E = 0)
                return torch.addmm(mu.view(R, m) @ W, Gt, v[:mw].view(m, nw)).view(R * nw, 1)

            self.ADJ = ADJ

        def C(y: Tensor) -> Tensor:  # [vec(Γ Y), 0]
            if y.shape[1] != 1:
                return C_any(y)
            cW = (Gam @ y.view(R, nw)).view(-1)
            return (torch.cat((cW, zeros)) if bias else cW).view(-1, 1)

        def CT(v: Tensor) -> Tensor:  # Γᵀ W_v
            if v.shape[1] != 1:
                return CT_any(v)
            return (Gt @ v[:mw].view(m, nw)).view(R * nw, 1)

        self.C, self.CT = C, CT


_PRODUCTS = frozenset(("F", "FT", "G", "GT", "GT_samples", "C", "CT", "A", "E", "HV", "TAN", "ADJ"))


def _weight_layout(o: Oracle, parts) -> tuple[int, Tensor | None] | None:
    """``(n_w, W)`` where the affine oracle is ``nn.Linear``'s: θ = ``[vec(W), b]`` (``n_w``
    weight columns, bias or not) and ``C = 0`` or ``C = P_θᵀ(Γ ⊗ [I; 0])``; ``W`` the
    ``m × n_w`` factor of ``F = I_R ⊗ W`` where ``F`` has that form, else ``None``.
    ``None`` for any other layout."""
    _, X, p_theta, Gam, Et, C_general = parts
    R, q = X.shape
    m = o.G.shape[0] // R
    nw = _weight_columns(p_theta, m, q)
    if C_general is not None or nw is None:
        return None
    if Gam is not None and not (nw == Et.shape[1] and padded_identity(Et)):
        return None
    W = identity_kronecker_factor(o.F)
    return nw, (W if W is not None and W.shape == (m, nw) else None)


def _one_sample_linear(o: Oracle, parts) -> tuple | None:
    """``(W, x, g)`` where the oracle is an ``nn.Linear``'s at one sample (θ = ``[vec(W), b]``
    or ``vec(W)``) and ``F = W`` (:func:`_weight_layout`; ``g = None`` where ``C = 0``);
    else ``None``: the conditions under which the products fuse and batched runs apply."""
    layout = _weight_layout(o, parts)
    X, Gam = parts[1], parts[3]
    if layout is None or layout[1] is None or X.shape[0] != 1:
        return None
    nw, W = layout
    return W, X[:, :nw].mT, Gam


def _weight_columns(p_theta, m: int, q: int) -> int | None:
    """The number ``n_w`` of weight columns where the block declares ``nn.Linear``'s layout
    (θ = ``[vec(W), b]``, ``Θ̃ = [W | b]``, or ``Θ̃ = W`` without bias: a
    :class:`~tallskinny.blocks.linear.WeightBiasOrder`), else ``None``."""
    if not isinstance(p_theta, WeightBiasOrder) or p_theta.weight_columns < 1:
        return None
    if p_theta.out_features != m or p_theta.weight_columns + p_theta.bias != q:
        return None
    return p_theta.weight_columns


class CompiledBlocks(list):
    """The compiled oracles of a chain's blocks (a list), with what their HVPs of one
    vector batch (:mod:`tallskinny.elimination.runs`; found on first use)."""

    _plan = None

    def run_plan(self) -> tuple[dict, list[int]]:
        """``{start: (end, HVPRun)}`` and the offsets of the blocks' parameters."""
        if self._plan is None:

            offsets = [0]
            for b in self:
                offsets.append(offsets[-1] + b.p)
            runs = {start: (end, HVPRun(self[start:end])) for start, end in find_runs(self)}
            self._plan = (runs, offsets)
        return self._plan


def compile_oracles(oracles: Sequence[Oracle]) -> CompiledBlocks:
    return CompiledBlocks(CompiledOracle(o) for o in oracles)
