"""The output-kernel route: the Gauss–Newton matrix through its ``N·c``-dimensional kernel.

With ``Λ`` the loss's Hessian in the chain's outputs (positive semidefinite for a loss
convex in its input), ``Λ = B Bᵀ`` (``B`` of ``r`` columns), the Gauss–Newton matrix is

    G = Jᵀ Λ J = W Wᵀ,    W = Jᵀ B  (P × r),    K = Wᵀ W  (r × r, r ≤ N·c).

``K = U diag(μ) Uᵀ`` is eigendecomposed once; its eigenvalues are those of ``G`` that can
be nonzero, the other ``P − r`` are zero. For every damping (Woodbury, split into
``range(W)`` and its complement, and the determinant lemma; sums over ``μ_j > 0``):

    (G + εI)⁻¹ b = W U diag(1/(μ(μ + ε))) Uᵀ Wᵀ b + (b − W U diag(1/μ) Uᵀ Wᵀ b) / ε
    log det(G + εI) = Σ_j log(μ_j + ε) + (P − r)·log ε.

``Wᵀb = Bᵀ(J b)`` is one tangent sweep and ``W c = Jᵀ(B c)`` one adjoint sweep through the
blocks' oracles (no ``torch.func`` over the model: plugin blocks work). ``K`` is made
once per curvature, one of two ways:

* **per sample** where every block acts on the samples separately and every block with
  parameters is affine with one input row per sample (``nn.Linear`` on ``(N, n)``
  inputs: ``G`` made of ``x̃_s = [x_s; 1]``, ``F = I_N ⊗ W``) and ``Λ`` is block diagonal
  by sample: the adjoints ``μ_{l,s}`` (``m × c``) of each sample's output directions are
  swept per sample, and block ``l`` adds ``K_l[(s,i),(t,j)] = (x̃_sᵀx̃_t)·(μ_{l,s,i}ᵀμ_{l,t,j})``
  — ``2(N·c)²·m`` flops, never a ``P``-sized column;
* **explicitly** otherwise: ``W`` by one adjoint sweep of ``B``'s ``r`` columns, ``K = WᵀW``.

Rounding: ``K`` is exact to ``eps·‖G‖`` (a backward error of the size of ``G``'s own), so
``μ`` and the answers carry ``eps·cond`` relative errors, as a backward-stable solver's;
``Factorization.solve`` checks and refines as on every route.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import SingularSystemError
from ..linalg import Diagonal, Inertia, ScaledIdentity, pivot_tolerance
from ..linalg.kronecker import identity_kronecker_factor


def _symmetrized(M: Tensor) -> Tensor:
    return 0.5 * (M + M.mT)


def sample_blocks(loss_hessian: Tensor, samples: int) -> Tensor | None:
    """The diagonal blocks ``Λ_s`` (``N × c × c``, ``c = a/N``) where ``Λ`` is block
    diagonal by sample, else ``None`` (samples that interact in the loss)."""
    a = loss_hessian.shape[0]
    if samples < 1 or a % samples:
        return None
    c = a // samples
    idx = torch.arange(samples, device=loss_hessian.device)
    diag = loss_hessian.reshape(samples, c, samples, c)[idx, :, idx, :]  # N × c × c (a copy)
    if samples > 1 and int(diag.count_nonzero()) != int(loss_hessian.count_nonzero()):
        return None  # nonzeros off the blocks
    return diag


def loss_factor_blocks(loss_hessian: Tensor, samples: int) -> Tensor | None:
    """``B_s`` (``N × c × c``) with ``Λ = blockdiag_s(B_s B_sᵀ)`` where ``Λ`` is block
    diagonal by sample (:func:`sample_blocks`), else ``None``. Negative eigenvalues beyond
    rounding raise ``ValueError`` (the loss is not convex in its input: ``G`` is then not
    ``WWᵀ``)."""
    diag = sample_blocks(loss_hessian, samples)
    return None if diag is None else _psd_factor(_symmetrized(diag))


def _psd_factor(blocks: Tensor) -> Tensor:
    """``Q diag(√λ₊)`` of every symmetric block (``… × c × c``), ``λ`` below rounding as 0."""
    lam, Q = torch.linalg.eigh(blocks)
    scale = float(lam.abs().max()) if lam.numel() else 0.0
    tol = pivot_tolerance(blocks.shape[-1], lam.dtype, scale)
    if lam.numel() and float(lam.min()) < -tol:
        raise ValueError(
            f"the loss's Hessian in the outputs has a negative eigenvalue ({float(lam.min()):.3g}): "
            "the output-kernel route needs a loss convex in the chain's output"
        )
    return Q * torch.where(lam > tol, lam, torch.zeros_like(lam)).sqrt().unsqueeze(-2)


def semidefinite_part(loss_hessian: Tensor, samples: int, dtype: torch.dtype) -> Tensor:
    """``Λ`` in ``dtype`` with its negative eigenvalues set to zero, every other one kept
    (per sample where the samples do not interact in the loss, :func:`sample_blocks`: ``N``
    eigendecompositions of ``c × c``, else one of ``Λ``). For a ``Λ`` its own dtype's check
    already took as semidefinite (:func:`loss_factor_blocks`), whose negative eigenvalues
    are rounding."""
    blocks = sample_blocks(loss_hessian, samples)
    blocks = loss_hessian.unsqueeze(0) if blocks is None else blocks
    lam, Q = torch.linalg.eigh(_symmetrized(blocks.to(dtype)))
    clipped = (Q * lam.clamp(min=0.0).unsqueeze(-2)) @ Q.mT
    return torch.block_diag(*clipped) if clipped.shape[0] > 1 else clipped[0]


def loss_factor(loss_hessian: Tensor) -> Tensor:
    """``B`` (``a × a``) with ``Λ = B Bᵀ``, for any symmetric positive semidefinite ``Λ``."""
    return _psd_factor(_symmetrized(loss_hessian))


def output_loss_factor(loss_hessian: Tensor, samples: int | None, blocks: Tensor | None = None) -> Tensor:
    """``B`` (``a × r``) with ``Λ = B Bᵀ``: block diagonal from the per-sample factors
    ``blocks`` (:func:`loss_factor_blocks`, ``N`` eigendecompositions of ``c × c``) where
    the samples do not interact in the loss, else from one eigendecomposition of ``Λ``
    (``a³``)."""
    if blocks is None:
        blocks = loss_factor_blocks(loss_hessian, samples or 1)
    if blocks is None:
        return loss_factor(loss_hessian)
    return torch.block_diag(*blocks) if blocks.shape[0] > 1 else blocks[0]


# -- sweeps through the compiled oracles ---------------------------------------------------------
def tangent(blocks: Sequence, v: Tensor) -> Tensor | None:
    """``J v``: the output's tangent for parameter directions ``v`` (``P × k``); ``None``
    where it is zero."""
    offsets = _offsets(blocks)
    y = None
    for i, b in enumerate(blocks):
        if y is not None:
            y = b.F(y) if b.F is not None else None
        if b.p and b.G is not None:
            gv = b.G(v[offsets[i] : offsets[i + 1]])
            y = gv if y is None else y + gv
    return y


def adjoint(blocks: Sequence, u: Tensor, P: int) -> Tensor:
    """``Jᵀ u`` for output directions ``u`` (``a_L × k``): ``P × k``."""
    offsets = _offsets(blocks)
    out = u.new_zeros(P, u.shape[1])
    mu = u
    for i in reversed(range(len(blocks))):
        b = blocks[i]
        if b.p and b.GT is not None:
            out[offsets[i] : offsets[i + 1]] = b.GT(mu)
        if b.FT is None:
            break  # every adjoint upstream is zero
        mu = b.FT(mu)
    return out


def _offsets(blocks: Sequence) -> list[int]:
    out = [0]
    for b in blocks:
        out.append(out[-1] + b.p)
    return out


# -- the kernel K = WᵀW ---------------------------------------------------------------------------
def per_sample_adjoints(blocks: Sequence, oracles: Sequence, B_s: Tensor):
    """The per-sample sweep (module docstring): ``(i, X̃, μ)`` for every block ``i`` with
    parameters, ``X̃`` its ``N × q`` input rows and ``μ`` (``N × m × c'``) each sample's
    adjoints of its own output directions; ``None`` where a block does not allow it."""
    N = B_s.shape[0]
    mu = B_s
    out = []
    for i in reversed(range(len(blocks))):
        b, o = blocks[i], oracles[i]
        a_in, a_out, p = o.sizes
        if a_in % N or a_out % N:
            return None
        if p:
            parts = b.parts
            if parts is None or not b.sample_major or parts[1].shape[0] != N:
                return None
            m = a_out // N
            out.append((i, parts[1], mu))
            W = identity_kronecker_factor(o.F)
            if W is None or W.shape != (m, a_in // N):
                return None
            mu = W.mT @ mu  # batched over samples: (a_in/N) × c' each
            continue
        F = o.F
        if isinstance(F, Diagonal):
            mu = mu * F.diagonal.view(N, -1, 1)
        elif isinstance(F, ScaledIdentity) and F.shape[0] == F.shape[1]:
            if F.scale != 1.0:
                mu = mu * F.scale
        else:
            return None
    return out


def per_sample_kernel(blocks: Sequence, oracles: Sequence, B_s: Tensor) -> Tensor | None:
    """``K = WᵀW`` (``N·c × N·c``) by the per-sample sweep (module docstring), or ``None``
    where a block does not allow it. ``B_s``: the loss factor's blocks (``N × c × c'``)."""
    sweep = per_sample_adjoints(blocks, oracles, B_s)
    if sweep is None:
        return None
    N, c = B_s.shape[0], B_s.shape[2]
    K = B_s.new_zeros(N, c, N, c)
    for _, X, mu in sweep:
        M = mu.transpose(1, 2).reshape(-1, mu.shape[1])  # (s, i) × m
        Kl = (M @ M.mT).view(N, c, N, c)
        K.add_(Kl.mul_((X @ X.mT).view(N, 1, N, 1)))
    return K.reshape(N * c, N * c)


def per_sample_factor(blocks: Sequence, oracles: Sequence, B_s: Tensor, P: int) -> Tensor | None:
    """``W = Jᵀ B`` (``P × N·c``) by the per-sample sweep: block ``i``'s rows are
    ``x̃_s ⊗ μ_{i,s,j}`` (``2·N·c·p_i`` flops), or ``None`` where a block does not allow it."""
    sweep = per_sample_adjoints(blocks, oracles, B_s)
    if sweep is None:
        return None
    offsets = _offsets(blocks)
    W = B_s.new_zeros(P, B_s.shape[0] * B_s.shape[2])
    for i, _, mu in sweep:
        W[offsets[i] : offsets[i + 1]] = blocks[i].GT_samples(mu)
    return W


class OutputKernel:
    """``K = WᵀW``, made once per curvature; ``W`` applied by sweeps (module docstring).

    A damping is factored by Cholesky of ``K + εI`` (``r³/3`` flops) while ``range(W)`` has
    a complement (``r < P``, where Woodbury's single form is backward stable: its error
    ``eps·μ_max/ε`` is within ``eps·cond``); from the third damping on, at ``ε = 0`` and
    where ``r ≥ P``, from the eigendecomposition ``K = U diag(μ) Uᵀ`` (``≈ 4r³``, once),
    which every later damping reuses at ``O(r)`` for ``log|det|``."""

    CHOLESKY_DAMPINGS = 2
    """Dampings factored by Cholesky before the eigendecomposition is made."""

    def __init__(self, blocks: Sequence, oracles: Sequence, loss_hessian: Tensor, P: int, samples: int | None):
        self.blocks, self.P = blocks, P
        B_s = loss_factor_blocks(loss_hessian, samples or 1)  # (one "sample" where unknown)
        K = per_sample_kernel(blocks, oracles, B_s) if B_s is not None else None
        self.B = output_loss_factor(loss_hessian, samples, B_s)
        self.W = None
        if K is None:
            self.W = adjoint(blocks, self.B, P)  # P × r
            K = self.W.mT @ self.W
        self.r = K.shape[0]
        self.dtype = K.dtype
        # a float32 chain's kernel is factored in float64, where it is exact
        self.K = _symmetrized(K.double() if K.dtype == torch.float32 else K)
        self.norm = 0.0  # ‖G‖, known once the eigendecomposition is made
        self.factorizations = 0
        self._spectrum = None

    def spectrum(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(μ, U, μ_live, U_live)`` of ``K`` (made once). ``rank(K) ≤ P``: its ``r − P``
        smallest eigenvalues are zero, not rounding; eigenvalues at the rounding level of
        ``‖K‖`` count as zeros of ``G`` (a perturbation of ``G`` of its own rounding size):
        their directions lie in ``null(W)`` and stay out of the solves, where ``1/ε`` would
        amplify the rounding of ``W u``."""
        if self._spectrum is None:
            mu, U = torch.linalg.eigh(self.K)
            if self.r > self.P:
                mu[: self.r - self.P] = 0.0
            top = float(mu.max()) if self.r else 0.0
            mu[mu <= pivot_tolerance(self.r, mu.dtype, top)] = 0.0
            live = mu > 0
            self._spectrum = (mu, U, mu[live], U[:, live])
            self.norm = top  # ‖G‖ exactly
        return self._spectrum

    def apply_transpose(self, b: Tensor) -> Tensor:
        """``Wᵀ b`` (``r × k``)."""
        if self.W is not None:
            return self.W.mT @ b
        y = tangent(self.blocks, b)
        return self.B.new_zeros(self.r, b.shape[1]) if y is None else self.B.mT @ y

    def apply(self, c: Tensor) -> Tensor:
        """``W c`` (``P × k``)."""
        if self.W is not None:
            return self.W @ c
        return adjoint(self.blocks, self.B @ c, self.P)

    def gram_apply(self, x: Tensor, shift: float, out: Tensor | None = None) -> Tensor | None:
        """``(W Wᵀ + shift·I) x`` by two products with the kept ``W`` (``4·P·r·k`` flops
        instead of a sweep through the blocks), or ``None`` where ``W`` is not kept (the
        per-sample kernel). ``W Wᵀ`` is ``G`` to its rounding (``eps·‖G‖``)."""
        if self.W is None:
            return None
        out = torch.mul(x, shift, out=out) if out is not None else x * shift
        return out.addmm_(self.W, self.W.mT @ x)

    def norm_lower_bound(self) -> float:
        """A lower bound of ``‖G‖ = ‖K‖₂`` before ``K`` is eigendecomposed: the largest of
        ``max_i K_ii`` and ``‖K‖_F/√r`` (both ≤ ``λ_max`` of a positive semidefinite ``K``)."""
        if self._spectrum is not None:
            return self.norm
        if not self.r:
            return 0.0
        diag, frob = torch.stack((self.K.diagonal().max(), torch.linalg.matrix_norm(self.K) / math.sqrt(self.r))).tolist()
        return max(diag, frob)

    def factorize(self, damping: float):
        self.factorizations += 1
        if damping > 0 and self.r < self.P and self._spectrum is None and self.factorizations <= self.CHOLESKY_DAMPINGS:
            A = self.K.clone()
            A.diagonal().add_(damping)
            L, info = torch.linalg.cholesky_ex(A)
            if not bool(info):
                return CholeskyKernelFactorization(self, damping, L)
        return KernelFactorization(self, damping)


class KernelRouteFactorization:
    """What the output-kernel route's factorizations share: the kernel, the damping, and
    ``(G + εI) x`` from the kept factor where there is one
    (:meth:`OutputKernel.gram_apply`; the solve's backward-error check uses it)."""

    kernel: OutputKernel
    damping: float

    def apply(self, x: Tensor, out: Tensor | None = None) -> Tensor | None:
        """``(W Wᵀ + εI) x``, or ``None`` where ``W`` is not kept."""
        return self.kernel.gram_apply(x, self.damping, out)


class CholeskyKernelFactorization(KernelRouteFactorization):
    """``G + εI`` by Woodbury with the Cholesky factor ``L`` of ``K + εI`` (``r < P``)."""

    def __init__(self, kernel: OutputKernel, damping: float, L: Tensor):
        self.kernel, self.damping, self.L = kernel, damping, L
        self.norm_lower_bound = kernel.norm_lower_bound()

    def solve(self, b: Tensor) -> Tensor:
        k = self.kernel
        t = k.apply_transpose(b).to(self.L.dtype)
        coef = torch.cholesky_solve(t, self.L)
        return (b - k.apply(coef.to(b.dtype))) / self.damping

    def logdet(self) -> Tensor:
        rest = (self.kernel.P - self.kernel.r) * math.log(self.damping)
        return (2.0 * self.L.diagonal().log().sum() + rest).to(self.kernel.dtype)

    def sign(self) -> Tensor:
        return self.logdet().new_tensor(1.0)

    def inertia(self) -> Inertia:
        return Inertia(self.kernel.P, 0, 0)


class KernelFactorization(KernelRouteFactorization):
    """``G + εI`` through the eigendecomposition of ``K``: solves, ``log|det|``, inertia."""

    def __init__(self, kernel: OutputKernel, damping: float):
        self.kernel, self.damping = kernel, damping
        mu, _, mu_live, _ = kernel.spectrum()
        if damping == 0.0 and mu_live.shape[0] < kernel.P:
            raise SingularSystemError(
                f"the Gauss–Newton matrix has rank < P = {kernel.P}: G + εI is singular at damping=0",
                damping=0.0,
            )
        self.shifted = mu + damping
        # a shift (ε < 0) makes G + εI indefinite: singular where it meets an eigenvalue
        tol = pivot_tolerance(kernel.r, mu.dtype, kernel.norm + abs(damping))
        if damping < 0 and bool((self.shifted.abs() <= tol).any()):
            raise SingularSystemError(
                f"G + εI is singular at damping={damping:g}: an eigenvalue of G within rounding ({tol:.2g}) of {-damping:g}",
                damping=damping,
            )
        self.norm_lower_bound = kernel.norm

    def solve(self, b: Tensor) -> Tensor:
        k = self.kernel
        _, _, mu, U = k.spectrum()
        t = U.mT @ k.apply_transpose(b).to(U.dtype)
        # on range(W) (orthonormal basis W U μ^{-1/2}): 1/(μ + ε); on its complement: 1/ε.
        # Split so, a rounding error of b's projection is divided by ε only where the
        # complement exists (Woodbury's single form cancels b against W(…) at every ε ≪ μ)
        span = k.apply((U @ (t / (mu * (mu + self.damping)).unsqueeze(-1))).to(b.dtype))
        if mu.shape[0] == k.P:  # range(W) is everything
            return span
        rest = b - k.apply((U @ (t / mu.unsqueeze(-1))).to(b.dtype))
        return span + rest / self.damping

    def logdet(self) -> Tensor:
        rest = (self.kernel.P - self.kernel.r) * (math.log(abs(self.damping)) if self.damping != 0 else 0.0)
        return (self.shifted.abs().log().sum() + rest).to(self.kernel.dtype)

    def sign(self) -> Tensor:
        return self.logdet().new_tensor(-1.0 if self.inertia().negative % 2 else 1.0)

    def inertia(self) -> Inertia:
        if self.damping >= 0:
            return Inertia(self.kernel.P, 0, 0)
        # a shift: μ + ε < 0 below it, and ε < 0 on the P − r directions outside K's
        negative = int((self.shifted < 0).sum()) + self.kernel.P - self.kernel.r
        return Inertia(self.kernel.P - negative, negative, 0)
