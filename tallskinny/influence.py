"""Influence functions with an exact inverse Hessian (Koh & Liang, 2017).

The influence of up-weighting training example ``z_i`` on the loss at a test point is

    I(z_i, z_test) = −∇L(z_test)ᵀ (H + εI)⁻¹ ∇L(z_i)

with ``H`` the Hessian (or Gauss–Newton matrix) of the chain's loss over the training
set, at the trained parameters. ``I > 0``: up-weighting ``z_i`` increases the test loss
(a harmful example); ``−I/n`` is the first-order change of the test loss when ``z_i`` is
removed from a mean-reduced training loss of ``n`` examples.

``H + εI`` is factored once; all test gradients are solved for together, as the
columns of one right-hand side; training gradients are per example (one backward pass
each).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .per_example import per_example_gradients
from .batches import one_batch
from .chain import Chain
from .curvature import check_damping, check_kind


def _check_pair(pair, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{what} must be a pair (inputs, targets), got {type(pair).__name__}")
    inputs, targets = pair
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"{what} inputs and targets must be tensors")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{what} inputs and targets need the same number of examples along dimension 0, "
            f"got shapes {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    return inputs, targets


def _pair(data, what: str, distributed: bool | None, chain: Chain):
    """A pair as given, or the concatenated batches of a loader (gathered over the ranks
    where ``distributed`` asks, :func:`tallskinny.batches.one_batch`)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        if not distributed:
            return data
        data, targets = data
    else:
        targets = None
    return one_batch(data, targets, what=what, distributed=distributed, parameters=chain.parameters())


def _check_finite_rows(grads: Tensor, what: str) -> None:
    """Every per-example gradient is finite (else a ``ValueError`` naming the first example)."""
    finite = torch.isfinite(grads).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        raise ValueError(f"the gradient of {what} example {i} contains NaN or inf (check its inputs and target)")


def influence(
    chain: Chain,
    train: Sequence[Tensor],
    test: Sequence[Tensor],
    *,
    damping: float,
    kind: str = "hessian",
    method: str = "auto",
    distributed: bool | None = None,
) -> Tensor:
    """``(n_test, n_train)`` influence scores ``−∇L(z_test)ᵀ (H + εI)⁻¹ ∇L(z_i)``.

    ``train`` and ``test`` are ``(inputs, targets)`` pairs, examples along dimension 0, or
    re-iterables of such batches (a ``DataLoader``; concatenated). ``method`` is the
    curvature's route (:meth:`tallskinny.Chain.curvature`). ``distributed``: under
    ``torch.distributed`` a loader (``True``: a pair too) is this rank's shard, and the
    scores are those of all ranks' test and training examples, in rank order, on every
    rank (:mod:`tallskinny.distributed`).
    ``H`` is the ``kind`` (``"hessian"`` or ``"ggn"``) curvature of the chain's loss on
    all of ``train`` (its cost grows like the cube of the number of training examples
    in one curvature: use a representative subset for large data). Raises
    :class:`tallskinny.SingularSystemError` if ``H + εI`` is singular.
    """
    damping = check_damping(damping)
    kind = check_kind(kind)
    x_train, y_train = _check_pair(_pair(train, "train", distributed, chain), "train")
    x_test, y_test = _check_pair(_pair(test, "test", distributed, chain), "test")
    curv = chain.curvature(x_train, y_train, kind=kind, method=method)
    test_grads = per_example_gradients(chain, x_test, y_test)  # (n_test, P)
    _check_finite_rows(test_grads, "test")
    solved = curv.factorize(damping).solve(test_grads.T.contiguous())  # (P, n_test)
    train_grads = per_example_gradients(chain, x_train, y_train)  # (n_train, P)
    scores = -(train_grads @ solved).T
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("influence scores overflowed (H + εI is too ill-conditioned)")
    return scores
