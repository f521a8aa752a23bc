"""Data sharded over the processes of ``torch.distributed``: every rank gets the curvature
of the loss over all ranks' samples.

When ``torch.distributed`` is initialized and a loader is given (to
:meth:`tallskinny.Chain.curvature`, :class:`tallskinny.laplace.Laplace`,
:func:`tallskinny.influence.influence`), each rank's loader is its shard (a
``DistributedSampler``'s part of the data set) and the curvature is that of the loss over
the samples of all ranks, as if they were one batch, on every rank: for a mean-reduced
loss the mean over all samples of all ranks (shards of unequal size included), for a
sum-reduced one the sum.

**How, and why that way.** The shards are all-gathered, in rank order, so that every rank
holds the same concatenated batch and runs the same single-process computation on it:

* the Riccati elimination and the output kernel couple the samples (the elimination's
  state is a layer's activations over the whole batch; the kernel ``K`` is
  ``N·c × N·c`` over all samples), so a rank cannot factor its part alone;
* the dense route's ``P × P`` matrix, the gradient and the HVPs are sums over samples and
  could be all-reduced instead, but only where the loss's reduction weights are known
  (a custom loss, ``ignore_index``, ``MSELoss``'s mean over every entry), and at a cost of
  ``8·P²`` bytes per all-reduce against the data's ``N·d``; the factorization's own checks
  (residuals, refinement) would need an all-reduce per product too. Gathering the data
  is exact for every loss and every route.

Communication, ``R`` ranks of ``n_r`` samples, ``d`` bytes per sample (inputs and
targets): one small ``all_gather_object`` of each rank's shapes, dtypes and a 16-byte
fingerprint of the parameters, then two ``all_gather`` calls of ``R·max_r n_r·d`` bytes
received per rank (the shards are padded to the largest). The work is not divided: every
rank computes the whole curvature (the memory of the whole batch on each rank); what
distribution gives is the exact answer, the same on every rank, with the data pipeline
left sharded.

**Identical on every rank.** The ranks' samples are concatenated in rank order (rank 0
first) and the computation after the gather is the same on every rank, so the results are
bitwise equal on ranks of the same hardware and software (the tests check it). Every
rank must make the same calls in the same order (they are collectives), with the same
parameters: a rank whose parameters differ raises :class:`ShardMismatchError` on every
rank, before any work, as does a rank whose shard disagrees on the samples' shape or
dtype, or whose loader failed (that rank raises its own error).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
from torch import Tensor


class ShardMismatchError(ValueError):
    """The ranks' shards (or parameters) disagree: every rank raises it, before any work."""


def is_active() -> bool:
    """Whether ``torch.distributed`` is available and initialized."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def resolve(distributed, *, loader: bool, what: str) -> bool:
    """Whether to gather the shards: ``distributed=None`` (the default) gathers a loader's
    batches where ``torch.distributed`` is initialized (tensors given directly are this
    process's data alone); ``True`` gathers loaders and tensors alike (it needs
    ``torch.distributed`` initialized); ``False`` never gathers."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"{what}: distributed must be None, True or False, got {distributed!r}")
    if distributed is None:
        return loader and is_active()
    if distributed and not is_active():
        raise RuntimeError(
            f"{what}: distributed=True needs torch.distributed initialized "
            "(torch.distributed.init_process_group, as torchrun's processes do)"
        )
    return distributed


def fingerprint(parameters: Iterable[Tensor]) -> str:
    """A hash of the parameters' shapes, dtypes and bytes (equal on two ranks exactly when
    their parameters are bitwise equal, up to hash collisions)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parameters:
        t = p.detach().reshape(-1).cpu().contiguous()
        h.update(f"{tuple(p.shape)}{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather(
    local: tuple[Tensor, Tensor] | None,
    *,
    what: str,
    error: BaseException | None = None,
    parameters: Sequence[Tensor] | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """The concatenation, in rank order, of every rank's ``(inputs, targets)`` (collective:
    every rank calls it). ``local`` is this rank's shard (``None``: no samples here);
    ``error`` an exception this rank met making it (every rank then raises: this one
    ``error``, the others :class:`ShardMismatchError` naming it); ``parameters`` are
    checked to be bitwise equal on every rank; ``device``: where an empty shard's result
    goes (else the shard's own device)."""
    dist = torch.distributed
    world = dist.get_world_size()
    rank = dist.get_rank()
    meta = {"error": None if error is None else f"{type(error).__name__}: {error}"}
    if error is None and local is not None:
        x, y = local
        meta.update(
            n=(x.shape[0] if x.dim() else None, y.shape[0] if y.dim() else None),
            tails=(tuple(x.shape[1:]), tuple(y.shape[1:])),
            dtypes=(str(x.dtype), str(y.dtype)),
            device=x.device.type,
        )
    if parameters is not None:
        meta["parameters"] = fingerprint(parameters)
    metas: list = [None] * world
    dist.all_gather_object(metas, meta)

    failed = [(r, m["error"]) for r, m in enumerate(metas) if m["error"] is not None]
    if failed:
        if error is not None:
            raise error
        r, msg = failed[0]
        raise ShardMismatchError(f"{what}: the shard of rank {r} failed ({msg}); no rank went on")
    prints = {m.get("parameters") for m in metas}
    if len(prints) > 1:
        differ = [r for r, m in enumerate(metas) if m.get("parameters") != metas[0].get("parameters")]
        raise ShardMismatchError(
            f"{what}: the parameters of rank(s) {differ} differ from rank 0's: every rank needs the same "
            "model (broadcast its state, as DistributedDataParallel does, before asking for curvature)"
        )
    full = [r for r, m in enumerate(metas) if "n" in m]
    if not full:
        raise ValueError(f"{what} holds no batches on any of the {world} ranks")
    for r in full:
        m = metas[r]
        if None in m["n"]:
            raise ShardMismatchError(f"{what}: the shard of rank {r} has 0-dim inputs or targets (no sample dimension)")
        for key, name in (("tails", "sample shapes (inputs, targets)"), ("dtypes", "dtypes (inputs, targets)"),
                          ("device", "device type")):
            if m[key] != metas[full[0]][key]:
                raise ShardMismatchError(
                    f"{what}: ranks disagree on the {name}: rank {full[0]} has {metas[full[0]][key]}, "
                    f"rank {r} {m[key]}"
                )
    first = metas[full[0]]
    counts = [metas[r]["n"] if "n" in metas[r] else (0, 0) for r in range(world)]
    if local is None:
        dtypes = [getattr(torch, s.split(".")[-1]) for s in first["dtypes"]]
        where = device if device is not None else torch.device("cpu")
        local = tuple(
            torch.empty((0,) + tail, dtype=dt, device=where) for tail, dt in zip(first["tails"], dtypes)
        )
    out = tuple(_all_gather_rows(t, [c[j] for c in counts]) for j, t in enumerate(local))
    return out[0], out[1]


def _all_gather_rows(t: Tensor, counts: list[int]) -> Tensor:
    """Every rank's ``t`` (``counts[r]`` rows on rank ``r``, the same trailing shape and
    dtype everywhere) concatenated in rank order, sent as bytes (any dtype, bitwise)."""
    dist = torch.distributed
    row = _row_bytes(t)
    longest = max(counts)
    carrier = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).to(carrier)
    padded = torch.zeros(longest * row, dtype=torch.uint8, device=carrier)
    padded[: raw.numel()] = raw
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    joined = torch.cat([p[: n * row] for p, n in zip(parts, counts)])
    return joined.view(t.dtype).reshape((sum(counts),) + tuple(t.shape[1:])).to(t.device)


def _row_bytes(t: Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n * t.element_size()
