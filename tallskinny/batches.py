"""Data given as one batch or as a re-iterable of ``(inputs, targets)`` batches.

The curvature of a chain's loss over a data set is the curvature of the loss over all its
samples as if they were one batch (the loss's own reduction: the mean over all samples
for ``reduction="mean"``, the sum for ``"sum"``). :func:`one_batch` makes that batch: a
loader's batches are concatenated along the first dimension (a partial last batch
included). Under ``torch.distributed``, each rank's loader is its shard and the shards
are gathered (:mod:`tallskinny.distributed`). Every sample's activations are then held
at once; the route planner and the memory check see the whole batch.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import distributed as shards


def one_batch(
    data, targets=None, *, what: str = "data", distributed: bool | None = None, parameters=None
) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``: ``data`` and ``targets`` themselves where ``data`` is a tensor,
    else the batches of the re-iterable ``data`` (``(X, y)`` pairs; a ``DataLoader``)
    concatenated (``targets`` must then be ``None``).

    Where the shards are gathered (:func:`tallskinny.distributed.resolve`: by default a
    loader's batches when ``torch.distributed`` is initialized), the result is every
    rank's batch concatenated in rank order, the same on every rank (a collective call;
    ``parameters``, an iterable of tensors, are checked to be equal on every rank)."""
    if distributed is not None or shards.is_active():
        if shards.resolve(distributed, loader=not isinstance(data, Tensor), what=what):
            params = None if parameters is None else list(parameters)
            device = params[0].device if params else None
            try:
                local = _local(data, targets, what, empty_ok=True)
            except Exception as err:  # noqa: BLE001 (raised on this rank once the others know)
                return shards.gather(None, what=what, error=err, parameters=params, device=device)
            return shards.gather(local, what=what, parameters=params, device=device)
    return _local(data, targets, what)


def _local(data, targets, what: str, empty_ok: bool = False) -> tuple[Tensor, Tensor] | None:
    if isinstance(data, Tensor):
        if targets is None:
            raise TypeError(f"{what}: a tensor of inputs needs its targets (an (inputs, targets) pair)")
        return data, targets
    if targets is not None:
        raise TypeError(f"{what}: targets are given with the batches of a loader, not beside it")
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{what} must be a tensor of inputs (with targets) or a re-iterable of (inputs, targets) "
            f"batches such as a DataLoader, got {type(data).__name__}"
        )
    xs, ys = [], []
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{what}: batch {i} is not an (inputs, targets) pair ({type(batch).__name__})")
        x, y = batch
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{what}: batch {i} must hold tensors, got {type(x).__name__}, {type(y).__name__}")
        if xs and (x.shape[1:] != xs[0].shape[1:] or y.shape[1:] != ys[0].shape[1:]):
            raise ValueError(
                f"{what}: batch {i} has inputs {tuple(x.shape)} and targets {tuple(y.shape)}, the first "
                f"batch {tuple(xs[0].shape)} and {tuple(ys[0].shape)}: samples must have one shape"
            )
        xs.append(x)
        ys.append(y)
    if not xs:
        if empty_ok:
            return None  # an empty shard: the other ranks may hold samples
        raise ValueError(f"{what} holds no batches")
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
