"""Which exact route to take: a cost model from the shapes, before any work.

Every route is exact (see ``docs/routes.md``); their costs differ by orders of magnitude
with the shape of the problem. With ``a_l`` the activations of block ``l`` (batch
included), ``p_l`` its parameters, ``P = Σ p_l``, ``r`` the rank of the loss's Hessian in
the outputs (``≤ N·c``):

* ``riccati`` — the stagewise elimination: ``≈ 7·Σ_l max(a_in, a_out)³`` flops for the
  blocks with parameters, ``a²`` for the others; memory ``Σ_l a_l²`` (the factors);
* ``kernel`` (Gauss–Newton only) — the ``r × r`` kernel ``K`` by a per-sample sweep
  (``2·r²·m_l`` per block with ``m_l`` outputs per sample) and the Cholesky factor of
  ``K + εI`` (``r³/3``; its eigendecomposition, ``≈ 4r³``, where ``r ≥ P``); a solve is
  two sweeps of one column; memory ``2·r² + 2·P``;
* ``dense`` — the ``P × P`` matrix (``2·P²·r`` from the kernel's factor, or ``P`` HVPs for
  the Hessian) and its eigendecomposition (``9·P³``); memory ``3·P²``.

Time is flops at a nominal rate plus a fixed cost per Python-level step (a stage, a
block of the sweep): the constants below were fitted on tanh MLPs here (one thread);
only their ratios matter. ``auto`` takes the cheapest route that fits the memory limit.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from .krylov import Krylov

ROUTES = ("riccati", "kernel", "dense")
"""The exact routes (the ones ``auto`` chooses among)."""
METHODS = ("auto",) + ROUTES + ("krylov",)
"""What ``method=`` accepts (or a :class:`~tallskinny.routes.Krylov` of options);
``krylov`` is inexact and taken only where asked for."""

FLOP_RATE = 2.0e10
"""Nominal float64 flops per second of one thread (dense products of moderate size)."""

STEP_SECONDS = 4.0e-5
"""Fixed cost of one Python-level step (a stage of the elimination, a block of a sweep)."""


@attrs.frozen
class RouteCost:
    """The estimated cost of one route: ``seconds`` (flops at :data:`FLOP_RATE` plus steps),
    ``bytes`` it keeps, and ``why`` it does not apply (``None`` where it does)."""

    name: str
    flops: float
    steps: int
    bytes: float
    why: str | None = None

    @property
    def seconds(self) -> float:
        return self.flops / FLOP_RATE + self.steps * STEP_SECONDS


def check_method(method):
    """``method`` itself where it is one of :data:`METHODS` or a
    :class:`~tallskinny.routes.Krylov` (else ``ValueError``)."""
    if isinstance(method, Krylov):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or a tallskinny.routes.Krylov, got {method!r}")
    return method


def resolve(method, costs: Sequence[RouteCost], limit: float | None) -> tuple[str, str, Krylov | None]:
    """The route's name, why it was taken, and the Krylov options (``None`` on an exact
    route); ``ValueError`` where an exact route asked for does not apply."""
    method = check_method(method)
    if isinstance(method, Krylov) or method == "krylov":
        options = method if isinstance(method, Krylov) else Krylov()
        return "krylov", "asked for (iterative, inexact: its cost depends on the iterations, not estimated)", options
    if method == "auto":
        return (*choose(costs, limit), None)
    cost = next(c for c in costs if c.name == method)
    if cost.why is not None:
        raise ValueError(f"method={method!r}: {cost.why}")
    return method, "asked for", None


def route_costs(
    sizes: Sequence[tuple[int, int, int]], outputs: int, samples: int | None, kind: str, itemsize: int
) -> list[RouteCost]:
    """The cost of every route for blocks of ``sizes`` ``(a_in, a_out, p)``, ``outputs``
    loss inputs (``N·c``) and ``samples`` (``N``, ``None`` where unknown)."""
    P = sum(p for _, _, p in sizes)
    N = samples or 1
    r = outputs
    stage_flops = sum(7.0 * max(a_in, a_out) ** 3 if p else 2.0 * a_in * a_out for a_in, a_out, p in sizes)
    riccati = RouteCost(
        "riccati", stage_flops, len(sizes), itemsize * sum(max(a_in, a_out) ** 2 + p for a_in, a_out, p in sizes)
    )
    # K by the per-sample sweep (2r²·m per block with parameters) and its eigh (≈ 4r³);
    # a solve is two sweeps of one column (≈ 4 flops per parameter and activation pair)
    gram = sum(2.0 * r * r * a_out / N for _, a_out, p in sizes if p)
    sweeps = 4.0 * sum(p + a_in * a_out / N for a_in, a_out, p in sizes)
    factor = r**3 / 3.0 if r < P else 4.0 * r**3  # Cholesky of K + εI, or its eigendecomposition
    kernel = RouteCost("kernel", gram + factor + sweeps, 3 * len(sizes), itemsize * (2.0 * r * r + 2.0 * P))
    if kind != "ggn":
        kernel = attrs.evolve(kernel, why="the Hessian is not a Gram matrix (Gauss–Newton only)")
    forming = 2.0 * P * P * r + r * sweeps if kind == "ggn" else P * 2.0 * sweeps
    dense = RouteCost("dense", forming + 9.0 * P**3, len(sizes) + 4, itemsize * 3.0 * P * P)
    return [riccati, kernel, dense]


def choose(costs: Sequence[RouteCost], limit: float | None) -> tuple[str, str]:
    """The cheapest route that applies and fits ``limit`` (bytes; ``None``: no limit), and
    why; ``riccati`` where none fits (the memory check then says what would)."""
    usable = [c for c in costs if c.why is None and (limit is None or c.bytes <= limit)]
    if not usable:
        return "riccati", "no route fits the memory limit"
    best = min(usable, key=lambda c: c.seconds)
    others = [c for c in usable if c is not best]
    if not others:
        return best.name, "the only route that applies and fits"
    runner = min(others, key=lambda c: c.seconds)
    return best.name, f"estimated {runner.seconds / max(best.seconds, 1e-12):.1f}× faster than {runner.name}"


def explain(costs: Sequence[RouteCost], chosen: str, why: str) -> str:
    """A table of the routes' estimated costs and the choice."""
    lines = [f"{'route':8s} {'est. time':>10s} {'GFlop':>9s} {'memory':>10s}  note"]
    for c in costs:
        note = c.why or ("chosen: " + why if c.name == chosen else "")
        lines.append(
            f"{c.name:8s} {c.seconds * 1e3:8.2f}ms {c.flops / 1e9:9.3f} {c.bytes / 2**20:8.1f}MiB  {note}"
        )
    if chosen not in {c.name for c in costs}:
        lines.append(f"{chosen:8s} {'—':>10s} {'—':>9s} {'—':>10s}  chosen: {why}")
    return "\n".join(lines)
