"""Memory estimates from shapes alone, and the check that refuses a call that would not
fit, before any work is done.

Each estimate is the peak of the *new* allocations of one call, in bytes: an upper bound
meant to stay within about 2× of the truth (the figures measured are in the changelog).
Sizes below count elements; bytes are elements × the dtype's itemsize.

**The curvature pass** (``Chain.curvature``, checked after the forward pass): ``4·Σ_l a_l``
(the adjoints, the backward pass, the finiteness check) and every block's oracle as the
block states it from the shapes of its input and output, ``(kept, scratch)``
(:class:`~tallskinny.blocks.protocol.OracleMemory`; the ``torch.func`` fallback forms the
dense Jacobian ``a_out × (p + a_in)`` and Hessian ``(p + a_in)²``), the loss's included:
``Σ kept + max scratch``, the oracles being made one after the other.

**The factorization** (``Curvature.factorize``, checked before the elimination). A block
with parameters is eliminated on its *span* of ``n`` directions: ``n = m·min(R, q)`` for a
block affine in its parameters (``m`` outputs per row of its ``R × q`` input matrix ``X̃``),
``n = min(a_out, p)`` otherwise; ``p − n`` directions are its *complement*. Per stage:

* *prepared* once per curvature and kept: the coupling ``C`` on the span (``n × a_in``), the
  complement's curvature ``C_⊥ᵀC_⊥`` (``a_in²``), for a dense block its row space
  (``n·(p + a_out)``) and its complement (``p·a_in``, or ``p·(p − n)`` where ``A ≠ 0``);
* the *factor*, kept by the factorization: the span pivot and its Cholesky/LU (``2n²``;
  ``3n²`` from ``n = 128``, where an LU's wide solves keep a row-major copy, ``linalg.lu``),
  ``Q_ζy`` and ``K`` (``2n·a_in``);
* *scratch* while the stage is eliminated: the value Hessian it receives (``a_out²``), the
  new one and its symmetrised copy (``2a_in²``; more where ``F`` is used densely), the
  products ``G_VᵀS`` (``n·a_out``) and ``SF`` (``a_out·a_in``).

Factors accumulate from the loss backwards, scratch does not:
``peak = Σ_l prepared_l + max(preparation's scratch, max_l (Σ_{k ≥ l} factor_k + scratch_l))``.
At ``ε = 0`` a stage with a complement sends the factorization to the pivoted KKT system,
whose blocks of ``b_l = p_l + 2a_l`` rows are all formed and factored:
``4·Σ_l b_l² + 2·Σ_l b_l·b_{l+1} + 3·max_l b_l²``.

**A solve** of ``k`` right-hand sides (``Factorization.solve``; ``Curvature.solve`` adds the
factorization): ``8P·k``, the solution, the sweeps' parts, the check's residual and the
refinements' corrections.

**The dense matrix** (``Curvature.to_dense``): ``3P²`` (the identity, the HVP's parts and
their concatenation) plus the HVP's tangents and products, ``P·(Σ_l a_l + 2·max_l a_l + 3·max_l p_l)``.

A call is refused with :class:`~tallskinny.errors.ResourceError` where its estimate exceeds
the limit: ``memory_limit=`` (bytes) where given, else the memory available now
(:func:`available_memory`). The estimates are shape arithmetic, made once per curvature (the
curvature pass's once per chain and input shape). Estimates below ``UNCHECKED_BYTES`` are not
compared with the available memory: reading ``/proc/meminfo`` costs more than the check.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Callable, Sequence

import attrs
import torch

from .elimination.runs import MIN_RUN
from .blocks.protocol import DeferredOracle, Oracle
from .errors import ResourceError
from .linalg import Diagonal, LowRank, ScaledIdentity, Zero
from .linalg.kronecker import identity_kronecker_factor
from .linalg.lu import ROW_MAJOR_MIN

UNCHECKED_BYTES = 64 * 2**20
"""Estimates below this many bytes are not compared with the available memory (an explicit
``memory_limit=`` is always compared)."""

POOL_BYTES = 64 * 2**20
"""The capacity of the workspace pool (``LIMIT_BYTES`` of ``tallskinny/elimination/workspace.py``): scratch
buffers given back to it stay allocated, for reuse."""

PYTHON_BYTES, PYTHON_BYTES_PER_BLOCK = 2**20, 16 * 2**10
"""The curvature pass's allowance for Python objects (operators, closures) and slack."""

#: forms of a stage of the elimination (:class:`StageShape`)
ACTIVATION, AFFINE, REDUCED, DENSE, RUN = "activation", "affine", "reduced", "dense", "run"


# ---------------------------------------------------------------------------------------
# Limits


def check_memory_limit(limit) -> float | None:
    """``memory_limit`` must be ``None`` (the available memory) or a number of bytes ``> 0``
    (``float('inf')`` disables the check)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real):
        raise TypeError(f"memory_limit must be a number of bytes or None, got {type(limit).__name__}")
    limit = float(limit)
    if math.isnan(limit) or limit <= 0:
        raise ValueError(f"memory_limit must be > 0 bytes (float('inf') disables the check), got {limit}")
    return limit


def available_memory(device: torch.device | str | None = None) -> int | None:
    """The bytes that new tensors on ``device`` can take now, ``None`` where unknown.

    CUDA: the device's free memory plus what PyTorch's caching allocator holds unused
    (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux; free
    and reclaimable memory), at most the limit of the process's memory cgroup less its
    usage where one is set; elsewhere ``os.sysconf`` free pages."""
    return _available(torch.device("cpu" if device is None else device))[0]


def _available(device: torch.device) -> tuple[int | None, str]:
    """The available bytes and where they were read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"the free memory of {device}"
    if device.type != "cpu":
        return None, ""
    found, source = _meminfo_available(), "MemAvailable"
    if found is None:
        try:
            found, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
        except (ValueError, OSError, AttributeError):
            return None, ""
    cgroup = _cgroup_available()
    if cgroup is not None and cgroup < found:
        return cgroup, "the memory cgroup's limit less its usage"
    return found, source


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """``limit − usage`` of the memory cgroup (v2, then v1), ``None`` without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_file)
        if limit is not None and limit < 2**60:  # v1 reports "no limit" as about 2⁶³
            usage = _read_int(usage_file)
            return None if usage is None else max(limit - usage, 0)
    return None


# ---------------------------------------------------------------------------------------
# Estimates


@attrs.frozen
class MemoryEstimate:
    """An estimated peak of new allocations: ``total`` bytes, of which ``largest_bytes``
    for the part ``largest`` (in words)."""

    total: int
    largest: str
    largest_bytes: int

    @classmethod
    def of(cls, terms: Sequence[tuple[str, int]], total: int | None = None) -> "MemoryEstimate":
        """From ``(what, bytes)`` terms (``total`` their sum unless given)."""
        label, largest = max(terms, key=lambda t: t[1], default=("nothing", 0))
        return cls(int(sum(b for _, b in terms) if total is None else total), label, int(largest))

    def __add__(self, other: "MemoryEstimate") -> "MemoryEstimate":
        """Two calls made one after the other, the first one's allocations kept."""
        big = self if self.largest_bytes >= other.largest_bytes else other
        return MemoryEstimate(self.total + other.total, big.largest, big.largest_bytes)


def format_bytes(n: float) -> str:
    """``131.1 GB`` (decimal units)."""
    if math.isinf(n):
        return "unlimited"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("not reached")


def format_count(n: int) -> str:
    """``131 072``."""
    return f"{n:,}".replace(",", " ")


OracleBytes = Callable[..., tuple[int, int]]


def curvature_estimate(
    sizers: Sequence[OracleBytes | None],
    loss_sizer: OracleBytes | None,
    shapes: Sequence[tuple[int, ...]],
    names: Sequence[str],
    *,
    second_order: bool,
    itemsize: int,
) -> MemoryEstimate:
    """The curvature pass: ``4·Σ a_l`` (the activations' adjoints, the backward pass, the
    finiteness check), then every oracle's kept bytes and the largest scratch
    (``shapes``: the input's and every block's output's, the last the loss's input;
    ``sizers[i]``: block ``i``'s ``oracle_bytes``, ``None`` where not stated)."""
    activations = 4 * sum(math.prod(s) for s in shapes) * itemsize
    # (the oracles' Python objects and the allocator's slack: measured ~1 MB on 3 blocks)
    activations += PYTHON_BYTES + PYTHON_BYTES_PER_BLOCK * len(sizers)
    kept_sum = scratch = 0
    largest, which = activations, -2  # -2: the activations, -1: the loss, else a block
    blocks = [(i, f, shapes[i], shapes[i + 1], second_order) for i, f in enumerate(sizers)]
    blocks.append((-1, loss_sizer, shapes[-1], (), True))  # the loss's oracle is its Hessian
    for i, sizer, z_in, z_out, full in blocks:
        if sizer is not None:
            kept, extra = sizer(z_in, z_out, second_order=full, itemsize=itemsize)
            kept_sum, scratch = kept_sum + kept, max(scratch, extra)  # the oracles are made one by one
            if kept + extra > largest:
                largest, which = kept + extra, i
    label = (
        "the activations' adjoints and their finiteness check" if which == -2
        else "the loss's oracle" if which == -1 else f"block {which} ({names[which]}): its oracle"
    )
    return MemoryEstimate(int(activations + kept_sum + scratch), label, int(largest))


def batch_shapes(shapes: Sequence[tuple[int, ...]], samples: int) -> list[tuple[int, ...]]:
    """``shapes`` with their leading (batch) dimension set to ``samples``."""
    return [(samples,) + tuple(s[1:]) for s in shapes]


def samples_of(shapes: Sequence[tuple[int, ...]]) -> int | None:
    """The batch size ``B`` where every shape leads with the same ``B > 1``, else ``None``."""
    if not shapes or not shapes[0] or len(shapes[0]) < 2:
        return None
    B = shapes[0][0]
    if B < 2 or any(not s or s[0] != B for s in shapes):
        return None
    return B


@attrs.frozen
class StageShape:
    """What the memory of one stage of the elimination depends on.

    ``form``: ``ACTIVATION`` (no parameters), ``AFFINE`` (affine in its parameters,
    eliminated in span coordinates), ``REDUCED`` (affine, its span as a dense stage: a
    convolution, or the last block), ``DENSE`` (any other block with parameters), ``RUN``
    (``layers`` one-sample Linear + activation pairs of width ``m``). The span is
    ``m·min(rows, cols)`` (``rows × cols`` the shape of ``X̃``; for a dense stage ``m = 1``,
    ``rows = a_out``, ``cols = p``)."""

    index: int
    name: str
    form: str
    a_in: int
    a_out: int
    p: int = 0
    m: int = 1
    rows: int = 0
    cols: int = 0
    coupled: bool = False  # C ≠ 0
    curvature_rank: int = 0  # the rank of A (≤ p; 0: A = 0, p: dense)
    curved_input: bool = False  # E ≠ 0
    dense_F: bool = False  # F has no structure the congruence uses
    dense_C: bool = False  # C is made dense in the preparation (a convolution's)
    dense_G: bool = False  # G is made dense in the preparation (REDUCED only)
    layers: int = 1

    @property
    def span(self) -> int:
        if self.form == ACTIVATION:
            return 0
        if self.form == RUN:
            return self.m
        return self.m * min(self.rows, self.cols)

    @property
    def complement(self) -> bool:
        """Whether the stage has directions where ``Q_θθ = εI`` exactly (singular at ``ε = 0``)."""
        return self.form == RUN or (self.form != ACTIVATION and self.p > self.span)

    def batch(self, samples: int, of: int) -> "StageShape":
        """The stage at ``samples`` samples instead of ``of``."""
        if self.form == RUN:
            return self
        rows = self.rows * samples // of if self.form != DENSE else self.a_out * samples // of
        return attrs.evolve(self, a_in=self.a_in * samples // of, a_out=self.a_out * samples // of, rows=rows)

    def gauss_newton(self) -> "StageShape":
        """The stage of the Gauss–Newton matrix: ``A = C = E = 0`` (``F`` and ``G`` stay)."""
        return attrs.evolve(self, coupled=False, curvature_rank=0, curved_input=False, dense_C=False)

    def elements(self) -> dict[str, list[tuple[str, tuple, int]]]:
        """The stage's terms by kind: ``keep`` (prepared, kept), ``prep`` (scratch of the
        preparation), ``factor`` (kept by a factorization), ``scratch``; each term is
        ``(what, its sizes, elements)`` (``what.format(*sizes)`` describes it)."""
        ai, ao, p, n = self.a_in, self.a_out, self.p, self.span
        # the value Hessian received, the new one and its symmetrised copy
        value = "the value Hessian S ({}²), its update ({}²) and their products"
        if self.form == ACTIVATION:
            scratch = ao * ao + 2 * ai * ai + (2 * ao * ai + ai * ai if self.dense_F else 0)
            return {"keep": [], "prep": [], "factor": [], "scratch": [(value, (ao, ai), scratch)]}
        if self.form == RUN:
            J, m = self.layers, self.m
            return {
                "keep": [("the data of {} layers", (J,), 4 * J * m)],
                "prep": [],
                "factor": [("the factors and pivots of {} layers of width {}", (J, m), 4 * J * m * m)],
                "scratch": [(value, (m, m), 12 * m * m)],
            }
        perp = max(p - n, 0)
        factor = [
            ("the span pivot, its factor and (n ≥ 128, LU) the factor's row-major copy ({}²)", (n,), (3 if n >= ROW_MAJOR_MIN else 2) * n * n),
            ("Q_ζy and K ({} × {})", (n, ai), 2 * n * ai),
        ]
        keep: list[tuple[str, tuple, int]] = []
        prep: list[tuple[str, tuple, int]] = []
        S = ao * ao + 2 * ai * ai
        if self.form in (AFFINE, REDUCED):
            rows, cols = self.rows, self.cols
            keep.append(("the SVD of X̃ ({} × {})", (rows, cols), min(rows, cols) * (rows + cols)))
            if self.coupled:
                keep.append(("C on the span ({} × {})", (n, ai), (2 if self.form == REDUCED else 1) * n * ai))
                if perp and (self.form == REDUCED or self.dense_F):
                    keep.append(("the complement's curvature C_⊥ᵀC_⊥ ({}²)", (ai,), ai * ai))
                    prep.append(("the complement's curvature C_⊥ᵀC_⊥ ({}²)", (ai,), ai * ai))
            if self.dense_C:
                keep.append(("C on the complement ({} × {})", (perp, ai), perp * ai))
                prep.append(("C made dense ({} × {})", (p, ai), 2 * p * ai))
            if self.curved_input:
                keep.append(("E ({}²)", (ai,), ai * ai))
            if self.form == REDUCED and self.dense_G:
                # G on the span made dense, its rank lowered (dead units, the loss's null
                # space): a part of the span joins the complement, with its C_⊥ᵀC_⊥
                keep.append(("G on the span made dense ({} × {})", (ao, n), ao * n + p * n + n * ai + ai * ai))
                prep.append(("the SVD of G on the span ({} × {})", (ao, n), 2 * ao * n + 4 * n * n + ai * ai))
            # (n²: the pivot's factor copied by the solve, or a failed Cholesky before the LU;
            # G_VᵀS and SF stay referenced until the stage returns)
            if self.form == AFFINE and not self.dense_F:
                scratch = S + n * ao + ao * ai + n * n
            else:
                scratch = S + 2 * ai * ai + n * ao + 2 * ao * ai + n * ai + n * n
        else:  # DENSE
            keep.append(("the row space of G ({} × {})", (n, p + ao), n * (p + ao + ai)))
            prep.append(("the SVD of G ({} × {})", (ao, p), 2 * ao * p + ao * n + 4 * n * n))
            kA = min(self.curvature_rank, p)
            kz = min(kA, perp)  # the complement's directions where A ≠ 0
            if kz:
                keep.append(("A on the complement ({} × {})", (p, kz), p * kz + kz * (ai + n)))
                if kA == p:  # dense A: its eigendecomposition on the complement
                    prep.append(("A on the complement ({}²)", (p,), 3 * p * p + 2 * kz * kz + p * kz))
                else:  # A = U M Uᵀ: an SVD of U on the complement
                    prep.append(("A's factor on the complement ({} × {})", (p, kA), 3 * p * kA + 2 * kA * kA))
            if perp > kz:
                keep.append(("C on the complement ({} × {})", (p, ai), p * ai + ai * ai))
            scratch = S + 2 * ai * ai + n * ao + 2 * ao * ai + n * ai + n * n
        return {"keep": keep, "prep": prep, "factor": factor, "scratch": [(value, (ao, ai), scratch)]}

    def describe(self, term: tuple[str, tuple, int]) -> str:
        """A term of :meth:`elements` in words, with the block it belongs to."""
        what, sizes, _ = term
        return f"block {self.index} ({self.name}): " + what.format(*map(format_count, sizes))


def factorization_estimate(
    stages: Sequence[StageShape], *, prepared: bool, kkt: bool, itemsize: int, pooled: bool = True
) -> MemoryEstimate:
    """The peak of a factorization's new allocations (see the module docstring);
    ``prepared``: the stages' prepared data exists already; ``kkt``: at ``ε = 0``, with a
    stage that has a complement (the pivoted KKT system follows the Riccati attempt);
    ``pooled``: on the CPU, where the workspace pool keeps buffers."""
    keep = prep_peak = 0
    largest, owner = ("nothing", (), 0), None
    groups = []
    for s in stages:
        parts = s.elements()
        groups.append(parts)
        counted = parts["factor"] + parts["scratch"]
        if not prepared:
            keep += sum(t[2] for t in parts["keep"])
            prep_peak = max(prep_peak, sum(t[2] for t in parts["prep"]))
            counted = counted + parts["keep"] + parts["prep"]
        for term in counted:
            if term[2] > largest[2]:
                largest, owner = term, s
    peak, factors, scratch = prep_peak, 0, 0
    for parts in reversed(groups):  # the elimination runs from the loss backwards
        factors += sum(t[2] for t in parts["factor"])  # this stage's own factor exists at its peak
        stage = sum(t[2] for t in parts["scratch"])
        peak, scratch = max(peak, factors + stage), max(scratch, stage)
    label = owner.describe(largest) if owner is not None else "nothing"
    if kkt:
        # the KKT system of every block (the Riccati attempt's factors are freed first);
        # kept: the diagonal blocks, their pivots' factors (a split pivot keeps two more
        # b × b matrices) and the couplings with their multipliers
        b = [s.p + 2 * s.a_out for s in _kkt_blocks(stages)]
        kept = 4 * sum(x * x for x in b) + 2 * sum(x * y for x, y in zip(b, b[1:]))
        biggest = max(b, default=0)
        peak = max(peak, kept + 3 * biggest * biggest)
        if kept > largest[2]:
            largest = ("", (), kept)
            label = f"the pivoted KKT system (blocks of up to {format_count(biggest)} rows)"
    # scratch given back to the workspace pool stays allocated for reuse instead of being
    # freed: at most the pool's capacity, at most one stage's scratch
    pool = min(POOL_BYTES, scratch * itemsize) if pooled else 0
    return MemoryEstimate((keep + peak) * itemsize + pool, label, largest[2] * itemsize)


def _kkt_blocks(stages: Sequence[StageShape]) -> list[StageShape]:
    """The blocks of the KKT system: a run is its layers again (Linear, activation)."""
    out = []
    for s in stages:
        if s.form == RUN:
            lin = StageShape(s.index, s.name, DENSE, s.m, s.m, s.m * s.m + s.m)
            act = StageShape(s.index, s.name, ACTIVATION, s.m, s.m)
            out += [lin, act] * s.layers
        else:
            out.append(s)
    return out


def stage_shapes(oracles: Sequence[Oracle], compiled, names: Sequence[str]) -> list[StageShape]:
    """The :class:`StageShape` of every stage that ``elimination.prepare_stages`` makes of
    these oracles (``compiled``: their :class:`~tallskinny.elimination.compiled.CompiledBlocks`; its
    run plan and the blocks' affine structure are computed here once, as the stages need them)."""
    n = len(oracles)
    last = max((i for i, c in enumerate(compiled) if c.p), default=-1)
    runs = {}
    # a run is cut before the last block with parameters (as elimination.prepare_stages does)
    for start, (end, run) in compiled.run_plan()[0].items():
        J = (min(end, last) - start) // 2
        if J >= MIN_RUN:
            runs[start] = J, run.p
    out: list[StageShape] = []
    i = 0
    while i < n:
        if i in runs:
            J, p_layer = runs[i]
            m = compiled[i].linear[0].shape[0]
            out.append(StageShape(i, names[i], RUN, m, m, J * p_layer, m=m, layers=J))
            i += 2 * J
            continue
        o, c = oracles[i], compiled[i]
        a_in, a_out, p = o.sizes
        if not p:
            diagonal = c.diagonal is not None or _structured(o.F)
            out.append(StageShape(i, names[i], ACTIVATION, a_in, a_out, dense_F=not diagonal))
            i += 1
            continue
        A = o.A
        kw = dict(
            coupled=not isinstance(o.C, Zero),
            curvature_rank=0 if isinstance(A, Zero) else A.U.shape[1] if isinstance(A, LowRank) else p,
            curved_input=not isinstance(o.E, Zero),
            dense_F=not _structured(o.F),
        )
        parts = c.parts
        if parts is not None:
            X, C_general = parts[1], parts[5]
            R, q = X.shape
            reduced = i == last or not c.sample_major
            dense_G = i == last or (i + 1 < n and _dead_units(oracles[i + 1]))
            out.append(
                StageShape(
                    i, names[i], REDUCED if reduced else AFFINE, a_in, a_out, p, m=a_out // max(R, 1), rows=R, cols=q,
                    dense_C=C_general is not None, dense_G=reduced and dense_G, **kw,
                )
            )
        else:
            out.append(StageShape(i, names[i], DENSE, a_in, a_out, p, rows=a_out, cols=p, **kw))
        i += 1
    return out


def _structured(F) -> bool:
    """Whether the congruence ``FᵀSF`` uses the structure of ``F`` (diagonal, ``I ⊗ W``)."""
    return isinstance(F, (Diagonal, ScaledIdentity, Zero)) or identity_kronecker_factor(F) is not None


def _dead_units(nxt: Oracle) -> bool:
    """Whether the next block zeroes some outputs exactly (a ReLU's dead units): the stage
    before it then makes its span's ``G`` dense."""
    if isinstance(nxt, DeferredOracle) and not nxt.built and nxt.diagonal is not None:
        return not bool(nxt.diagonal[0].all())
    return not nxt.G.shape[1] and isinstance(nxt.F, Diagonal) and not bool(nxt.F.diagonal.all())


def dense_estimate(P: int, activations: Sequence[int], parameters: Sequence[int], itemsize: int) -> MemoryEstimate:
    """``Curvature.to_dense``: ``3P²`` (the identity, the HVP's parts and their
    concatenation), the HVP's tangents ``P·(Σ a_l + 2 max a_l)`` and its products with
    one block's parameters ``3P·max p_l``."""
    tangents = P * (sum(activations) + 2 * max(activations, default=0) + 3 * max(parameters, default=0))
    terms = [
        (f"the dense matrix of {format_count(P)} parameters, its identity and the HVP's parts", 3 * P * P * itemsize),
        (f"the HVP's tangents ({format_count(P)} columns)", tangents * itemsize),
    ]
    return MemoryEstimate.of(terms)


def solve_bytes(P: int, columns: int, itemsize: int, gmres_steps: int = 0) -> int:
    """``Factorization.solve`` of ``k`` right-hand sides: ``8P·k`` (the solution, the sweeps'
    parts, the check's product and residual, the refinements' corrections; measured
    4.7–7.2 ``P·k`` elements), and with ``gmres_steps = s`` a GMRES refinement's
    ``2s + 3`` more (its basis, the preconditioned basis, the best iterate, the correction)."""
    return (8 + (2 * gmres_steps + 3 if gmres_steps else 0)) * P * columns * itemsize


def solve_estimate(P: int, columns: int, itemsize: int, gmres_steps: int = 0) -> MemoryEstimate:
    """:func:`solve_bytes` with its description."""
    total = solve_bytes(P, columns, itemsize, gmres_steps)
    what = f"the solve's {format_count(columns)} vectors of {format_count(P)}"
    if gmres_steps:
        what += f", with the GMRES refinement's ({gmres_steps} steps)"
    return MemoryEstimate(total, what, total)


def batch_advice(estimate_at: Callable[[int], int], samples: int, limit: float) -> str:
    """The largest batch ``b < samples`` with ``estimate_at(b) ≤ limit``, in words."""
    lo, hi = 0, samples - 1  # estimate_at grows with b: bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_at(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if not lo:
        return "not even one sample fits"
    return f"a batch of at most {lo} samples fits (about {format_bytes(estimate_at(lo))})"


# ---------------------------------------------------------------------------------------
# The check


def fits(total: int, limit: float | None) -> bool:
    """Whether ``total`` bytes surely pass :func:`require` (no estimate made, nothing read)."""
    return total < UNCHECKED_BYTES if limit is None else total <= limit


def require(
    estimate: MemoryEstimate,
    limit: float | None,
    device: torch.device,
    *,
    what: str,
    advice: Callable[[float], list[str]] | None = None,
) -> None:
    """Raise :class:`~tallskinny.errors.ResourceError` where ``estimate`` exceeds ``limit``
    (``None``: the available memory, compared only from ``UNCHECKED_BYTES`` on). ``advice``
    gives, for the limit, what would fit (called only on refusal)."""
    if limit is None:
        if estimate.total < UNCHECKED_BYTES:
            return
        limit, source = _available(device)
        if limit is None:
            return
        source = f"the available memory, {source}"
    else:
        source = "memory_limit"
    if estimate.total <= limit:
        return
    hints = advice(limit) if advice is not None else []
    raise ResourceError(
        f"{what} would need about {format_bytes(estimate.total)}, more than the limit of {format_bytes(limit)} "
        f"({source}); the largest part: {estimate.largest} ({format_bytes(estimate.largest_bytes)}). "
        + (f"Instead: {'; '.join(hints)}. " if hints else "")
        + "memory_limit= (bytes) sets the limit, memory_limit=float('inf') disables the check.",
        estimate=estimate.total,
        limit=limit,
        largest=estimate.largest,
    )
