"""From oracles to stages: which stage kind eliminates each block (once per curvature)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..blocks.protocol import Oracle
from ..linalg import Dense, Diagonal, Identity, Zero, pivot_tolerance
from ..linalg.kronecker import Kronecker, Product
from . import runs
from .algebra import congruence, plus, symmetrize
from .compiled import CompiledBlocks, CompiledOracle
from .structure import channels_first
from .stages.activation import ActivationStage
from .stages.affine import AffineStage
from .stages.covered import COVERED
from .stages.dense import DenseStage
from .stages.permuted import PermutedStage
from .stages.reduced_affine import ReducedAffineStage
from .stages.run import LinearRunStage, admissible


def prepare_stages(oracles: Sequence[Oracle], loss: Oracle, compiled: Sequence | None = None) -> list:
    """The ε-independent stage data of every block (computed once per curvature).

    Runs of one-sample ``nn.Linear`` + activation pairs (:mod:`tallskinny.elimination.stages.run`)
    get one :class:`~tallskinny.elimination.stages.run.LinearRunStage` at their first block (the
    others hold :data:`~tallskinny.elimination.stages.covered.COVERED`). Blocks affine in their
    parameters (their oracle says so with Kronecker-structured operators) get an
    :class:`~tallskinny.elimination.stages.affine.AffineStage` (a
    :class:`~tallskinny.elimination.stages.reduced_affine.ReducedAffineStage` where their
    output is ordered channel-major, a convolution's, and a
    :class:`~tallskinny.elimination.stages.permuted.PermutedStage` dense stage on ``vec Θ̃``
    where dead ReLU units follow at one sample: :func:`_by_channel`); other blocks with
    parameters a :class:`~tallskinny.elimination.stages.dense.DenseStage`; blocks without an
    :class:`~tallskinny.elimination.stages.activation.ActivationStage`.
    ``compiled`` are the oracles' :class:`~tallskinny.elimination.compiled.CompiledOracle` where at
    hand (the stages then share their products and their reading of the structure).
    """
    if compiled is None:
        compiled = CompiledBlocks(CompiledOracle(o) for o in oracles)
    elif not isinstance(compiled, CompiledBlocks):
        compiled = CompiledBlocks(compiled)
    last = max((i for i, c in enumerate(compiled) if c.p), default=-1)
    stages: list = [None] * len(oracles)
    for start, stage in _run_stages(compiled, last):
        stages[start] = stage
        stages[start + 1 : stage.end] = [COVERED] * (stage.end - start - 1)
    for i, (o, c) in enumerate(zip(oracles, compiled)):
        if stages[i] is not None:
            continue
        if o.G.shape[1] == 0:
            stages[i] = ActivationStage(o, c)
            continue
        parts = c.parts
        output_range = _value_hessian_range(oracles[i + 1:], loss) if i == last else None
        if parts is not None and output_range is None and c.sample_major:
            # outputs the next block ignores (dead ReLU units) need no special care here:
            # their rows of S are exactly zero, so Q_ζζ has the exact pivot ε there
            stages[i] = AffineStage(o, parts, c)
            continue
        if i == last:
            kw = dict(output_range=output_range)
        else:
            kw = dict(
                ignored_rows=_ignored_rows(oracles[i + 1] if i + 1 < len(oracles) else None),
                zero_inputs=_zero_inputs(oracles[i - 1]) if i else None,
            )
        if parts is None:
            stages[i] = DenseStage(o, **kw)
        elif _by_channel(o, parts, kw):
            X, p_theta = parts[1], parts[2]
            m = o.G.shape[0] // X.shape[0]
            G = Kronecker(Identity(m, dtype=X.dtype, device=X.device), Dense(X))
            tilde = Oracle(G=G, F=o.F, A=o.A, C=Product(p_theta, o.C), E=o.E)
            stages[i] = PermutedStage(DenseStage(tilde, **kw), p_theta)
        else:
            stages[i] = ReducedAffineStage(o, parts, **kw)
    return stages


def _by_channel(o: Oracle, parts, kw) -> bool:
    """Whether an affine block at one sample with its output ordered channel-major (a
    convolution) and dead units after it is eliminated as a dense stage on ``vec Θ̃``,
    its span split by channel (``G = I_m ⊗ X̃`` with the dead rows dropped). That stage
    carries all ``m·q`` parameters densely (its basis, ``C`` on the rest), the span stage
    only ``m·rank X̃``: it is taken where ``X̃`` (``R × q``) has ``q ≤ 2R``, and where
    ``C ≠ 0`` (with ``C = 0`` the span stage eliminates the complement without any
    ``p × a`` matrix)."""
    R, q = parts[1].shape
    return (
        kw.get("ignored_rows") is not None
        and DenseStage.use_structure
        and channels_first(parts)
        and q <= 2 * R
        and not isinstance(o.C, Zero)
        and isinstance(o.E, Zero)
    )


def _run_stages(compiled, last: int):
    """``(start, LinearRunStage)`` of the batched HVP runs of ``compiled`` (a
    :class:`~tallskinny.elimination.compiled.CompiledBlocks`), each cut before the last block with
    parameters (whose stage also drops the loss's null space) and kept if it still has
    ``runs.MIN_RUN`` pairs and every layer has ``x̃ ≠ 0`` (:func:`~.stages.run.admissible`)."""
    out = []
    for start, (end, run) in compiled.run_plan()[0].items():
        J = (min(end, last) - start) // 2
        if J >= runs.MIN_RUN and admissible(run, J):
            out.append((start, LinearRunStage(run, start, J)))
    return out


def _value_hessian_range(activations: Sequence[Oracle], loss: Oracle) -> Tensor | None:
    """An orthonormal basis of the range of the value Hessian after the last block with
    parameters. It does not depend on ε (only parameter-free blocks and the loss follow),
    so its rank is decided once: eigenvalues below ``n·eps·max|λ|`` are zeros (the
    softmax invariance of cross-entropy gives one per sample). ``None``: full rank."""
    S = symmetrize(loss.E.to_dense())
    for o in reversed(activations):
        S = symmetrize(plus(o.E, congruence(o.F, S)))
    lam, Q = torch.linalg.eigh(S)
    n = lam.shape[0]
    keep = lam.abs() > pivot_tolerance(n, S.dtype, float(lam.abs().max()) if n else 0.0)
    if bool(keep.all()):
        return None
    return Q[:, keep]


def _ignored_rows(nxt: Oracle | None) -> Tensor | None:
    """Outputs whose value the next (parameter-free, diagonal) block discards exactly:
    ``F_kk = 0`` and ``E_kk = 0``, so neither ``y_k`` nor its curvature reaches the loss."""
    if nxt is None or nxt.G.shape[1] or not isinstance(nxt.F, Diagonal):
        return None
    dead = nxt.F.diagonal == 0
    if isinstance(nxt.E, Diagonal):
        dead = dead & (nxt.E.diagonal == 0)
    elif not isinstance(nxt.E, Zero):
        return None
    return dead if bool(dead.any()) else None


def _zero_inputs(prev: Oracle) -> Tensor | None:
    """Inputs that are identically zero: outputs of a parameter-free diagonal block with
    ``F_kk = 0`` (a ReLU's dead units). Nothing computed for them is read: the block
    before multiplies the value Hessian and the adjoint there by ``F_kk = 0``."""
    if prev.G.shape[1] or not isinstance(prev.F, Diagonal):
        return None
    dead = prev.F.diagonal == 0
    return dead if bool(dead.any()) else None
