"""Benchmark: exact (H + εI)⁻¹b of deep tanh MLPs against autograd HVPs, CG, MINRES and dense solves.

Run as ``python bench/chain.py`` (``--quick`` for a CI-sized run, ``--help`` for the flags).
One thread, float64. Models: tanh MLPs of ``L`` ``nn.Linear`` layers (width ``h``, input
width ``h``, 10 classes, cross-entropy, orthogonal weights, small biases) on a batch of
``B`` samples. For each model and damping ``ε`` it measures, as medians after a warm-up,

* ``chain.inverse_hvp(X, y, b, damping=ε)`` in one call, and its parts ``curvature()``,
  ``factorize(ε)`` (on a fresh curvature: the ε-independent stage preparation included),
  ``solve(b)`` (default ``refine=None``: one HVP checks the backward error, refinement, checked again after each step, only where it is above 64·eps) and a second ``solve`` with a new right-hand side;
* one HVP by double backward through the plain PyTorch model;
* accuracy: relative error against a dense solve with the Hessian from ``torch.func``
  (forward-over-reverse, column block by column block) where ``P`` is small enough, and the
  relative residual ``‖(H+εI)x − b‖/‖b‖`` with ``H`` applied by autograd, for every model;
* conjugate gradients and MINRES on exact autograd HVPs to relative residual 1e-8
  (at most 2000 products), where ``P`` is small enough;
* peak memory of one ``inverse_hvp``;
* the flops of the elimination (one factorization and one solve,
  ``Curvature.elimination_flops``), their floor at the float64 GEMM rate of this machine
  on matrices of the largest stage size (measured in the same run) and ``inverse_hvp``
  time / floor;

then the accuracy at ``ε = 1e-6``, and depth sweeps (time against ``L``, with a PNG plot).
Tables are printed as Markdown and written, with the plot and the raw numbers (JSON), to
``--out`` (default ``bench/out/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one-thread BLAS everywhere, subprocesses included

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))  # the helpers _krylov, _timing

import tallskinny as ts  # noqa: E402
from _flops import flop_floor  # noqa: E402
from _krylov import KrylovResult, conjugate_gradient, minres  # noqa: E402
from _timing import median_ratio, median_time, paired_times, synchronizer, timed  # noqa: E402

NUM_CLASSES = 10
DTYPE = torch.float64
REFERENCE_MODELS = ((16, 32, 1), (64, 32, 1), (256, 32, 1), (64, 64, 1), (16, 32, 8), (16, 32, 32), (64, 16, 4))
# the batch-1 models again with bias-free layers (nn.Linear(..., bias=False))
BIAS_FREE_MODELS = ((64, 32, 1, False), (256, 32, 1, False), (64, 64, 1, False))
# Every reference model has P > 16 000 (the smallest, L=16 h=32, has 16 170): these smaller
# ones (not part of the reference set) are where a dense reference runs.
SMALL_MODELS = ((8, 32, 1), (8, 32, 8), (32, 16, 4))
QUICK_MODELS = ((8, 16, 1), (8, 16, 4), (16, 32, 1))
DAMPINGS = (1e-3, 1e-1)
ACCURACY_DAMPING = 1e-6
DEPTHS = (8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_DEPTHS = (8, 16, 32, 64, 128)
NARROW_DEPTHS = (32, 128)
DENSE_LIMIT = 16_000
KRYLOV_LIMIT = 20_000
QUICK_LIMIT = 5_000
KRYLOV_RTOL = 1e-8
KRYLOV_MAXITER = 2000


# -- models ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A tanh MLP of ``L`` Linear layers, width ``h`` (input width ``h``), 10 classes, batch
    ``B``; every layer with a bias or (``bias=False``) none."""

    L: int
    h: int
    B: int
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("L", "h", "B"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"ModelSpec.bias must be a bool, got {self.bias!r}")

    @property
    def num_parameters(self) -> int:
        b = int(self.bias)
        return (self.L - 1) * (self.h * self.h + b * self.h) + self.h * NUM_CLASSES + b * NUM_CLASSES

    @property
    def label(self) -> str:
        return f"L={self.L} h={self.h} B={self.B}" + ("" if self.bias else " no bias")


def parse_model(text: str) -> ModelSpec:
    """``"L,h,B"`` or ``"L,h,B,nobias"`` → :class:`ModelSpec` (for ``--models``)."""
    parts = text.split(",")
    try:
        bias = len(parts) == 3
        if not (bias or (len(parts) == 4 and parts[3] == "nobias")):
            raise ValueError
        return ModelSpec(*(int(p) for p in parts[:3]), bias=bias)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a model is 'L,h,B' with three positive integers (layers, width, batch), or 'L,h,B,nobias' "
            f"for bias-free layers, got {text!r}"
        ) from None


@dataclass
class Problem:
    """One model at one point: the chain, the plain PyTorch model and two right-hand sides."""

    spec: ModelSpec
    model: nn.Sequential
    chain: ts.Chain
    params: list[Tensor]
    X: Tensor
    y: Tensor
    b: Tensor
    b2: Tensor
    sync: Callable[[], None]

    @property
    def P(self) -> int:
        return self.b.numel()


def build_problem(spec: ModelSpec, device: str | torch.device = "cpu", seed: int = 0) -> Problem:
    """The model of ``spec`` with orthogonal weights, biases ~ 0.1·N(0, 1), data and two ``b`` ~ N(0, I).

    Deterministic in ``(spec, seed)``; the global random state is left as it was.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + spec.L * 10_007 + spec.h * 101 + spec.B)
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global generator
        for i in range(spec.L):
            out = NUM_CLASSES if i == spec.L - 1 else spec.h
            linear = nn.Linear(spec.h, out, bias=spec.bias, dtype=DTYPE)
            with torch.no_grad():
                nn.init.orthogonal_(linear.weight, generator=gen)
                if spec.bias:
                    linear.bias.copy_(0.1 * torch.randn(out, generator=gen, dtype=DTYPE))
            layers.append(linear)
            if i < spec.L - 1:
                layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(device)
    chain = ts.Chain(list(model), loss=nn.CrossEntropyLoss())
    params = list(chain.parameters())
    if len(params) != len(list(model.parameters())) or any(a is not b for a, b in zip(params, model.parameters())):
        raise RuntimeError("the chain's parameters are not the model's, in the model's order")
    P = sum(p.numel() for p in params)
    assert P == spec.num_parameters, (P, spec)
    X = torch.randn(spec.B, spec.h, generator=gen, dtype=DTYPE).to(device)
    y = torch.randint(0, NUM_CLASSES, (spec.B,), generator=gen).to(device)
    b = torch.randn(P, generator=gen, dtype=DTYPE).to(device)
    b2 = torch.randn(P, generator=gen, dtype=DTYPE).to(device)
    return Problem(spec, model, chain, params, X, y, b, b2, synchronizer(device))


# -- autograd references -------------------------------------------------------------------
def _flat(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)])


def autograd_hvp(problem: Problem, v: Tensor) -> Tensor:
    """One HVP from scratch by double backward: forward, ∇loss with a graph, ∇(∇loss·v)."""
    params = problem.params
    loss = F.cross_entropy(problem.model(problem.X), problem.y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g.reshape(-1) * vi).sum() for g, vi in zip(grads, torch.split(v, [p.numel() for p in params])))
    return _flat(torch.autograd.grad(dot, params, allow_unused=True), params)


def autograd_operator(problem: Problem, damping: float) -> Callable[[Tensor], Tensor]:
    """``v ↦ (H + εI) v`` by autograd; the gradient's graph is built once and reused by every call."""
    params = problem.params
    loss = F.cross_entropy(problem.model(problem.X), problem.y)
    grad = _flat(torch.autograd.grad(loss, params, create_graph=True), params)

    def apply(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grad, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return _flat(hv, params).add_(v, alpha=damping)

    return apply


def dense_hessian(problem: Problem, chunk: int = 256) -> Tensor:
    """The ``P × P`` Hessian by ``torch.func`` (forward-over-reverse, ``chunk`` columns at a time)."""
    names = [name for name, _ in problem.model.named_parameters()]
    shapes = [p.shape for p in problem.params]
    sizes = [p.numel() for p in problem.params]
    theta = torch.cat([p.detach().reshape(-1) for p in problem.params])

    def loss_of(flat: Tensor) -> Tensor:
        pieces = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(problem.model, pieces, (problem.X,)), problem.y)

    gradient = torch.func.grad(loss_of)

    def column(e: Tensor) -> Tensor:
        return torch.func.jvp(gradient, (theta,), (e,))[1]

    P = theta.numel()
    H = torch.empty(P, P, dtype=theta.dtype, device=theta.device)
    for start in range(0, P, chunk):
        k = min(chunk, P - start)
        basis = torch.zeros(k, P, dtype=theta.dtype, device=theta.device)
        basis[torch.arange(k), start + torch.arange(k)] = 1.0
        H[start : start + k] = torch.func.vmap(column)(basis)
    H += H.mT.clone()
    H *= 0.5
    return H


def dense_solve(H: Tensor, damping: float, b: Tensor) -> Tensor:
    """``torch.linalg.solve(H + εI, b)`` (the diagonal shifted in place and restored)."""
    diagonal = H.diagonal().clone()
    H.diagonal().add_(damping)
    try:
        return torch.linalg.solve(H, b)
    finally:
        H.diagonal().copy_(diagonal)


def refined_dense_solve(H: Tensor, damping: float, b: Tensor, steps: int = 2) -> Tensor:
    """The dense LU solve of ``(H + εI)x = b`` with ``steps`` rounds of iterative
    refinement (residuals in float64 with the dense matrix, as LAPACK's ``gerfs``): a
    reference that is componentwise backward stable (Skeel), so its error is at most a few
    ``eps·cond`` — below the ``10·eps·cond`` that tallskinny's solve is measured against.
    (Its residual is not reliably smaller than the plain solve's: both are at rounding
    level.)"""
    diagonal = H.diagonal().clone()
    H.diagonal().add_(damping)
    try:
        LU, pivots = torch.linalg.lu_factor(H)
        x = torch.linalg.lu_solve(LU, pivots, b.unsqueeze(-1))
        for _ in range(steps):
            x = x + torch.linalg.lu_solve(LU, pivots, b.unsqueeze(-1) - H @ x)
        return x.squeeze(-1)
    finally:
        H.diagonal().copy_(diagonal)


def relative(a: Tensor, reference: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - reference) / torch.linalg.vector_norm(reference))


# -- one model -------------------------------------------------------------------------------
def _krylov_entry(result: KrylovResult, seconds: float, true_residual: float, x_dense: Tensor | None) -> dict:
    return {
        "iterations": result.iterations,
        "converged": result.converged,
        "seconds": seconds,
        "residual": true_residual,
        "negative_curvature_at": result.negative_curvature_at,
        "breakdown": result.breakdown,
        "rel_error": None if x_dense is None else relative(result.x, x_dense),
    }


def benchmark_model(
    spec: ModelSpec,
    *,
    dampings: Sequence[float] = DAMPINGS,
    repeats: int = 5,
    device: str = "cpu",
    dense_limit: int = DENSE_LIMIT,
    krylov_limit: int = KRYLOV_LIMIT,
    accuracy_damping: float | None = ACCURACY_DAMPING,
    krylov_rtol: float = KRYLOV_RTOL,
    krylov_maxiter: int = KRYLOV_MAXITER,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Every measurement of one model, as a JSON-ready dict (times in seconds).

    ``rows`` holds one entry per damping; ``accuracy`` the check at ``accuracy_damping``
    (only where the dense reference runs, ``P ≤ dense_limit``); skipped parts say why.
    """
    problem = build_problem(spec, device)
    chain, X, y, b, b2, sync = problem.chain, problem.X, problem.y, problem.b, problem.b2, problem.sync
    P = problem.P
    result: dict = {"L": spec.L, "h": spec.h, "B": spec.B, "P": P, "rows": []}

    result["hvp_seconds"] = median_time(lambda: autograd_hvp(problem, b), repeats, sync=sync)
    curvature = chain.curvature(X, y)
    result["floor"] = dict(flop_floor(curvature, repeats, device, sync), route=curvature.method)
    del curvature

    H = None
    if P <= dense_limit:
        log(f"{spec.label}: dense Hessian (P={P})")
        H, result["dense_hessian_seconds"] = timed(lambda: dense_hessian(problem), sync)
    else:
        result["dense_skipped"] = f"P = {P} > {dense_limit}"
    if P > krylov_limit:
        result["krylov_skipped"] = f"P = {P} > {krylov_limit}"

    def pipeline(damping: float):
        curvature, t_curvature = timed(lambda: chain.curvature(X, y), sync)
        factorization, t_factorize = timed(lambda: curvature.factorize(damping), sync)
        x, t_solve = timed(lambda: factorization.solve(b), sync)
        _, t_second = timed(lambda: factorization.solve(b2), sync)
        _, t_unrefined = timed(lambda: factorization.solve(b2, refine=0), sync)
        return x, factorization, (t_curvature, t_factorize, t_solve, t_second, t_unrefined)

    for damping in dampings:
        log(f"{spec.label}: timing ε={damping:g}")
        x, factorization, _ = pipeline(damping)  # warm-up, and the solution checked below
        parts: list[tuple] = []

        def median(i: int) -> float:
            return statistics.median(p[i] for p in parts)

        # inverse_hvp, one HVP and the pipeline (its phases timed one by one) in interleaved
        # rounds: the ratios ihvp/HVP and 2nd solve/ihvp are taken under the same load
        t_inverse, t_hvp, _ = paired_times(
            [lambda: chain.inverse_hvp(X, y, b, damping=damping), lambda: autograd_hvp(problem, b),
             lambda: parts.append(pipeline(damping)[2])],
            repeats, warmup=0, sync=sync,
        )  # fmt: skip
        row = {
            "damping": damping,
            "inverse_hvp_seconds": statistics.median(t_inverse),
            "hvp_seconds": statistics.median(t_hvp),
            "ihvp_over_hvp": median_ratio(t_inverse, t_hvp),
            "second_over_ihvp": median_ratio([p[3] for p in parts], t_inverse),
            "curvature_seconds": median(0),
            "factorize_seconds": median(1),
            "solve_seconds": median(2),
            "second_solve_seconds": median(3),
            "solve_refine0_seconds": median(4),
            "negative": factorization.inertia().negative,
        }
        row["time_over_floor"] = row["inverse_hvp_seconds"] / result["floor"]["floor_seconds"]
        row["time_over_lower_floor"] = row["inverse_hvp_seconds"] / result["floor"]["lower_floor_seconds"]
        operator = autograd_operator(problem, damping)
        row["rel_residual"] = relative(operator(x), b)
        x_dense = None
        if H is not None:
            x_dense, row["dense_solve_seconds"] = timed(lambda: dense_solve(H, damping, b), sync)
            row["rel_error"] = relative(x, x_dense)
        if P <= krylov_limit:
            for name, method in (("cg", conjugate_gradient), ("minres", minres)):
                log(f"{spec.label}: {name} ε={damping:g}")

                def run(method=method):
                    return method(autograd_operator(problem, damping), b, rtol=krylov_rtol, maxiter=krylov_maxiter)

                solution, seconds = timed(run, sync)
                row[name] = _krylov_entry(solution, seconds, relative(operator(solution.x), b), x_dense)
        result["rows"].append(row)
        del operator

    if accuracy_damping is not None and H is not None:
        log(f"{spec.label}: accuracy at ε={accuracy_damping:g}")
        x_dense = dense_solve(H, accuracy_damping, b)
        x_refined = refined_dense_solve(H, accuracy_damping, b)
        try:
            factorization = chain.curvature(X, y).factorize(accuracy_damping)
        except ts.SingularSystemError as err:
            result["accuracy"] = {"damping": accuracy_damping, "error": str(err)}
        else:
            x1 = factorization.solve(b)
            x0 = factorization.solve(b, refine=0)
            operator = autograd_operator(problem, accuracy_damping)
            result["accuracy"] = {
                "damping": accuracy_damping,
                "negative": factorization.inertia().negative,
                "rel_error": relative(x1, x_dense),
                "rel_error_refine0": relative(x0, x_dense),
                "rel_residual": relative(operator(x1), b),
                "dense_rel_residual": relative(operator(x_dense), b),
                "rel_error_vs_refined": relative(x1, x_refined),
                "refined_dense_rel_residual": relative(operator(x_refined), b),
                "dense_error_vs_refined": relative(x_dense, x_refined),
            }
    return result


# -- memory ----------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def memory_probe(spec: ModelSpec, operation: str, damping: float) -> dict:
    """Peak RSS growth of one call of ``operation`` on the CPU, in this (fresh) process.

    A warm-up call on a tiny model first loads the code paths (lazy library and kernel
    initialisation), without leaving freed buffers of the real size for the allocator to
    reuse. Then the peak is reset to the current RSS and the call runs: its extra peak is
    ``VmHWM − VmRSS(before)``. Where ``/proc`` cannot reset the peak, the growth of
    ``getrusage`` max RSS is used (a lower bound: 0 if the call stays under the earlier peak).
    """
    if operation not in ("inverse_hvp", "hvp"):
        raise ValueError(f"operation must be 'inverse_hvp' or 'hvp', got {operation!r}")

    def call(problem: Problem) -> Tensor:
        if operation == "inverse_hvp":
            return problem.chain.inverse_hvp(problem.X, problem.y, problem.b, damping=damping)
        return autograd_hvp(problem, problem.b)

    call(build_problem(ModelSpec(2, 2, 1)))
    problem = build_problem(spec, "cpu")
    gc.collect()
    if _reset_peak_rss() and _proc_status_kib("VmHWM") is not None:
        before = _proc_status_kib("VmRSS")
        call(problem)
        peak = _proc_status_kib("VmHWM")
        return {"method": "VmHWM", "before_kib": before, "peak_kib": peak, "extra_kib": peak - before}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call(problem)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": "getrusage", "before_kib": before, "peak_kib": peak, "extra_kib": peak - before}


def peak_memory(spec: ModelSpec, operation: str, damping: float, device: str) -> dict:
    """Extra peak memory of one call: a fresh subprocess on CPU, ``max_memory_allocated`` on CUDA."""
    if torch.device(device).type == "cuda":
        problem = build_problem(spec, device)
        call = {
            "inverse_hvp": lambda: problem.chain.inverse_hvp(problem.X, problem.y, problem.b, damping=damping),
            "hvp": lambda: autograd_hvp(problem, problem.b),
        }[operation]
        call()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"method": "cuda", "before_kib": before // 1024, "peak_kib": peak // 1024, "extra_kib": (peak - before) // 1024}
    command = [
        sys.executable, str(Path(__file__).resolve()), "--memory-probe", f"{spec.L},{spec.h},{spec.B}",
        "--probe-operation", operation, "--probe-damping", repr(damping),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {command} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- depth sweeps ------------------------------------------------------------------------------
def depth_sweep(h: int, B: int, depths: Sequence[int], damping: float, repeats: int, device: str, log=lambda m: None) -> list[dict]:
    """Median times of ``inverse_hvp`` and of one autograd HVP for each depth."""
    rows = []
    for L in depths:
        problem = build_problem(ModelSpec(L, h, B), device)
        log(f"depth sweep h={h} B={B}: L={L}")
        t_inverse, t_hvp = paired_times(
            [lambda: problem.chain.inverse_hvp(problem.X, problem.y, problem.b, damping=damping),
             lambda: autograd_hvp(problem, problem.b)],
            repeats, sync=problem.sync,
        )  # fmt: skip
        rows.append({
            "L": L,
            "P": problem.P,
            "inverse_hvp_seconds": statistics.median(t_inverse),
            "hvp_seconds": statistics.median(t_hvp),
            "ihvp_over_hvp": median_ratio(t_inverse, t_hvp),
        })  # fmt: skip
    return rows


def paired_depth_ratio(
    h: int, B: int, L_high: int, L_low: int, damping: float, repeats: int, device: str
) -> dict[str, float]:
    """``time(L_high)/time(L_low)`` of ``inverse_hvp`` and of one HVP, each from rounds that
    run both depths one after the other (median of the per-round ratios): the two depths
    see the same load, where the sweep's medians are taken minutes apart."""
    high, low = (build_problem(ModelSpec(L, h, B), device) for L in (L_high, L_low))

    def inverse(p: Problem):
        return lambda: p.chain.inverse_hvp(p.X, p.y, p.b, damping=damping)

    def hvp(p: Problem):
        return lambda: autograd_hvp(p, p.b)

    t_ih, t_il, t_hh, t_hl = paired_times([inverse(high), inverse(low), hvp(high), hvp(low)], repeats, sync=high.sync)
    return {"inverse_hvp": median_ratio(t_ih, t_il), "hvp": median_ratio(t_hh, t_hl)}


def sweep_ratio(rows: Sequence[dict], key: str, L_high: int, L_low: int) -> float | None:
    times = {r["L"]: r[key] for r in rows}
    if L_high in times and L_low in times:
        return times[L_high] / times[L_low]
    return None


def plot_depth(rows: Sequence[dict], h: int, B: int, damping: float, path: Path, device: str = "cpu") -> str:
    """Log-log plot of time against depth; returns what happened, for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    Ls = [r["L"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(Ls, [1e3 * r["inverse_hvp_seconds"] for r in rows], "o-", label=f"chain.inverse_hvp (ε={damping:g})")
    ax.loglog(Ls, [1e3 * r["hvp_seconds"] for r in rows], "s-", label="one autograd HVP")
    ref = 1e3 * rows[-1]["inverse_hvp_seconds"]
    ax.loglog(Ls, [ref * L / Ls[-1] for L in Ls], "k:", lw=1, label="∝ L")
    ax.set_xlabel("depth L (Linear layers)")
    ax.set_ylabel("time (ms)")
    where = "1 CPU thread" if torch.device(device).type == "cpu" else device
    ax.set_title(f"tanh MLP, width {h}, batch {B}, float64, {where}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# -- tables ------------------------------------------------------------------------------------
class Table:
    """A Markdown pipe table with fixed column widths, so that rows can be printed as they come."""

    def __init__(self, columns: Sequence[tuple[str, int]]):
        self.columns = [(title, max(width, len(title))) for title, width in columns]

    def header(self) -> list[str]:
        titles = "| " + " | ".join(t.rjust(w) for t, w in self.columns) + " |"
        rule = "|" + "|".join("-" * (w + 1) + ":" for _, w in self.columns) + "|"
        return [titles, rule]

    def row(self, values: Sequence[object]) -> str:
        if len(values) != len(self.columns):
            raise ValueError(f"a row needs {len(self.columns)} values, got {len(values)}")
        return "| " + " | ".join(str(v).rjust(w) for v, (_, w) in zip(values, self.columns)) + " |"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    value = 1e3 * seconds
    return f"{value:.3g}" if value < 10 else f"{value:.0f}" if value >= 1000 else f"{value:.1f}"


def sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def mib(kib: int | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.2f}"


def _krylov_cells(entry: dict | None) -> tuple[str, str, str]:
    if entry is None:
        return "skip", "skip", "skip"
    mark = "" if entry["converged"] else " ✗"
    if entry["negative_curvature_at"] is not None:
        mark += f" (−@{entry['negative_curvature_at']})"
    return f"{entry['iterations']}{mark}", ms(entry["seconds"]), sci(entry["residual"])


TIMING_TABLE = Table([
    ("L", 4), ("h", 3), ("B", 3), ("P", 7), ("ε", 5), ("inverse_hvp", 11), ("curvature", 9), ("factorize", 9),
    ("solve", 7), ("2nd solve", 9), ("refine=0", 8), ("HVP", 6), ("ihvp/HVP", 8), ("2nd/ihvp", 8),
])  # fmt: skip
ACCURACY_TABLE = Table([
    ("L", 4), ("h", 3), ("B", 3), ("P", 7), ("ε", 5), ("neg", 5), ("err vs dense", 12), ("residual", 8),
    ("dense ms", 8), ("CG it", 18), ("CG ms", 6), ("CG res", 7), ("MINRES it", 9), ("MINRES ms", 9), ("MINRES res", 10),
])  # fmt: skip
MEMORY_TABLE = Table([("L", 4), ("h", 3), ("B", 3), ("P", 7), ("inverse_hvp MiB", 15), ("HVP MiB", 7), ("P·8 bytes MiB", 13)])
TINY_DAMPING_TABLE = Table([
    ("L", 4), ("h", 3), ("B", 3), ("P", 7), ("ε", 5), ("neg", 5), ("err (default)", 14), ("err (refine=0)", 14),
    ("residual", 8), ("dense residual", 14), ("err vs refined", 14), ("refined residual", 16),
    ("dense err vs refined", 20),
])  # fmt: skip
FLOP_TABLE = Table([
    ("L", 4), ("h", 3), ("B", 3), ("P", 7), ("ε", 5), ("route", 7), ("GFLOP", 9), ("lower GFLOP", 11), ("n", 4),
    ("GEMM GFLOP/s", 12), ("floor ms", 8), ("inverse_hvp", 11), ("time/floor", 10), ("time/lower", 10),
])  # fmt: skip
DEPTH_TABLE = Table([("L", 5), ("P", 8), ("inverse_hvp ms", 14), ("HVP ms", 8), ("ihvp/HVP", 8)])


def timing_row(model: dict, row: dict) -> str:
    return TIMING_TABLE.row([
        model["L"], model["h"], model["B"], model["P"], f"{row['damping']:g}", ms(row["inverse_hvp_seconds"]),
        ms(row["curvature_seconds"]), ms(row["factorize_seconds"]), ms(row["solve_seconds"]),
        ms(row["second_solve_seconds"]), ms(row["solve_refine0_seconds"]), ms(row.get("hvp_seconds", model["hvp_seconds"])),
        f"{row.get('ihvp_over_hvp', row['inverse_hvp_seconds'] / model['hvp_seconds']):.1f}",
        f"{row.get('second_over_ihvp', row['second_solve_seconds'] / row['inverse_hvp_seconds']):.3f}",
    ])  # fmt: skip


def flop_row(model: dict, row: dict) -> str:
    f = model["floor"]
    return FLOP_TABLE.row([
        model["L"], model["h"], model["B"], model["P"], f"{row['damping']:g}", f["route"], f"{f['flops'] / 1e9:.4g}",
        f"{f['lower_flops'] / 1e9:.4g}", f["size"], f"{f['gemm_rate'] / 1e9:.2f}", ms(f["floor_seconds"]),
        ms(row["inverse_hvp_seconds"]), f"{row['time_over_floor']:.1f}", f"{row['time_over_lower_floor']:.1f}",
    ])  # fmt: skip


def accuracy_row(model: dict, row: dict) -> str:
    dense = "skip" if "dense_skipped" in model else None
    return ACCURACY_TABLE.row([
        model["L"], model["h"], model["B"], model["P"], f"{row['damping']:g}", row["negative"],
        dense or sci(row.get("rel_error")), sci(row["rel_residual"]), dense or ms(row.get("dense_solve_seconds")),
        *_krylov_cells(row.get("cg")), *_krylov_cells(row.get("minres")),
    ])  # fmt: skip


class Report:
    """Lines printed as they come and kept for the Markdown file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, table: Table, rows: Sequence[str]) -> None:
        for line in [*table.header(), *rows]:
            self(line)
        self()


def _environment() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    return [
        f"torch {torch.__version__}, Python {platform.python_version()}, {cpu}",
        f"tallskinny {ts.__version__}" + (f" (git {revision})" if revision else "") + f", {time.strftime('%Y-%m-%d %H:%M')}",
    ]


# -- the command --------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 3 repeats, short sweeps (CI smoke run, < 2 min)")
    parser.add_argument("--models", nargs="+", type=parse_model, metavar="L,h,B", help="models to run instead of the default set")
    parser.add_argument("--dampings", nargs="+", type=float, metavar="ε", help=f"dampings (default {' '.join(map(str, DAMPINGS))})")
    parser.add_argument("--repeats", type=int, help="timed runs per median (default 5, --quick 3)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="folder for chain.md, chain.json, chain_depth.png")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dense-limit", type=int, help=f"largest P with a dense reference (default {DENSE_LIMIT}, --quick {QUICK_LIMIT})")
    parser.add_argument("--krylov-limit", type=int, help=f"largest P for CG/MINRES (default {KRYLOV_LIMIT}, --quick {QUICK_LIMIT})")
    parser.add_argument("--depths", nargs="*", type=int, help="depths of the h=32, B=1 sweep (none: no sweep)")
    parser.add_argument("--narrow-depths", nargs="*", type=int, help=f"depths of the h=16, B=1 check (default {NARROW_DEPTHS})")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-probe", type=parse_model, help=argparse.SUPPRESS)
    parser.add_argument("--probe-operation", default="inverse_hvp", help=argparse.SUPPRESS)
    parser.add_argument("--probe-damping", type=float, default=DAMPINGS[0], help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns the raw results (also written to ``--out/chain.json``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if args.memory_probe is not None:
            print(json.dumps(memory_probe(args.memory_probe, args.probe_operation, args.probe_damping)))
            return {}
        return _run(args, parser)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch build")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.models:
        models = list(args.models)
    else:
        models = [ModelSpec(*m) for m in (QUICK_MODELS if args.quick else REFERENCE_MODELS + BIAS_FREE_MODELS + SMALL_MODELS)]
    dampings = tuple(args.dampings) if args.dampings else DAMPINGS
    if any(not (d >= 0 and math.isfinite(d)) for d in dampings):
        parser.error(f"--dampings must be finite and >= 0, got {dampings}")
    dense_limit = args.dense_limit if args.dense_limit is not None else (QUICK_LIMIT if args.quick else DENSE_LIMIT)
    krylov_limit = args.krylov_limit if args.krylov_limit is not None else (QUICK_LIMIT if args.quick else KRYLOV_LIMIT)
    depths = tuple(args.depths) if args.depths is not None else (QUICK_DEPTHS if args.quick else DEPTHS)
    narrow = tuple(args.narrow_depths) if args.narrow_depths is not None else NARROW_DEPTHS
    if any(L < 1 for L in depths + narrow):
        parser.error("depths must be positive integers")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"  [{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    report = Report()
    report("# tallskinny chain benchmark")
    report()
    for line in _environment():
        report(line)
    report(
        f"torch.set_num_threads(1): torch uses {torch.get_num_threads()} thread; device {args.device}; float64; "
        f"median of {repeats} runs after a warm-up; times in ms."
    )
    report(
        "Models: tanh MLPs, L nn.Linear layers (h→h, …, h→10), orthogonal weights, biases 0.1·N(0,1), "
        "inputs N(0,1) of width h, batch B, 10 classes, cross-entropy (mean); b ~ N(0, I)."
    )
    report()
    results: dict = {"device": args.device, "repeats": repeats, "models": [], "sweeps": {}}

    def save() -> None:
        (args.out / "chain.json").write_text(json.dumps(results, indent=1))

    # per model: timings, accuracy, baselines, memory
    report("## Time of (H + εI)⁻¹b")
    report()
    for line in TIMING_TABLE.header():
        report(line)
    for spec in models:
        model = benchmark_model(
            spec, dampings=dampings, repeats=repeats, device=args.device, dense_limit=dense_limit,
            krylov_limit=krylov_limit, log=log,
        )  # fmt: skip
        if not args.no_memory:
            log(f"{spec.label}: peak memory")
            model["memory"] = {op: peak_memory(spec, op, dampings[0], args.device) for op in ("inverse_hvp", "hvp")}
        results["models"].append(model)
        save()
        for row in model["rows"]:
            report(timing_row(model, row))
    report()
    report("inverse_hvp = chain.inverse_hvp(X, y, b, damping=ε) in one call; curvature = chain.curvature(X, y);")
    report("factorize = factorize(ε) on a fresh curvature (the ε-independent stage preparation included);")
    report("solve = solve(b) with the default refine=None (refinement, checked again after each step, only where the measured backward error asks for it); 2nd solve = solve of a new right-hand side with the same factors;")
    report("refine=0 = that solve never refining (solve(b, refine=0));")
    report("HVP = one Hessian-vector product by double backward through the plain PyTorch model (forward included); "
           "inverse_hvp, HVP and the pipeline curvature → factorize → solve → 2nd solve → refine=0 are timed in "
           "interleaved rounds (one of each per round); ihvp/HVP and 2nd/ihvp are medians of the per-round ratios, "
           "so both sides see the same load.")
    report()

    report("## Flop floor")
    report()
    report.table(FLOP_TABLE, [flop_row(m, r) for m in results["models"] for r in m["rows"]])
    report("GFLOP = the elimination's flops, one factorization and one solve (Curvature.elimination_flops: the "
           "products, pivot factorizations and triangular solves the stages run, as counted from the sizes they "
           "use); lower = the same without redundancy (symmetric products at half price, Cholesky/LDLᵀ, one "
           "triangular solve). n = the largest stage size; GEMM GFLOP/s = float64 torch.mm on n × n matrices, "
           "this thread, measured in this run (median); floor = GFLOP / GEMM rate; time/floor = inverse_hvp / "
           "floor (inverse_hvp also makes the curvature, prepares the stages and checks the solve with one HVP, "
           "none of which the floor counts). route = the route inverse_hvp takes (the count is the riccati "
           "elimination's).")
    report()

    report("## Accuracy and Krylov baselines")
    report()
    report.table(ACCURACY_TABLE, [accuracy_row(m, r) for m in results["models"] for r in m["rows"]])
    report("neg = negative eigenvalues of H + εI (inertia from the factorization).")
    report("err vs dense = ‖x − x_dense‖/‖x_dense‖, x_dense = torch.linalg.solve(H + εI, b) with H from torch.func "
           f"(forward-over-reverse); skipped where P > {dense_limit}. dense ms = that solve alone (one run).")
    report("residual = ‖(H + εI)x − b‖/‖b‖ of the tallskinny solution, H applied by autograd (independent of tallskinny).")
    report(f"CG, MINRES: on exact autograd HVPs (the gradient's graph built once and reused), from x = 0, to relative "
           f"residual {KRYLOV_RTOL:g}, at most {KRYLOV_MAXITER} products; one timed run each; skipped where P > {krylov_limit}. "
           "it = products with H; ✗ = not converged; (−@k) = CG met pᵀ(H+εI)p ≤ 0 first at iteration k "
           "(CG was run on regardless); res = final true relative residual.")
    report()

    if not args.no_memory:
        report("## Peak memory")
        report()
        rows = []
        for m in results["models"]:
            memory = m["memory"]
            rows.append(MEMORY_TABLE.row([m["L"], m["h"], m["B"], m["P"], mib(memory["inverse_hvp"]["extra_kib"]),
                                          mib(memory["hvp"]["extra_kib"]), f"{m['P'] * 8 / 2**20:.1f}"]))  # fmt: skip
        report.table(MEMORY_TABLE, rows)
        method = results["models"][0]["memory"]["inverse_hvp"]["method"] if results["models"] else ""
        if method == "cuda":
            report(f"Extra peak GPU memory of one call (ε={dampings[0]:g}) after a warm-up call: "
                   "torch.cuda.max_memory_allocated() − memory_allocated() before.")
        else:
            report(f"Extra peak resident memory (RSS) of one call (ε={dampings[0]:g}) in a fresh subprocess per model and "
                   "operation, after a warm-up call on a tiny model: the peak (VmHWM) is reset to the current RSS through "
                   "/proc/self/clear_refs, then VmHWM − VmRSS(before). (getrusage's ru_maxrss is not used: a child "
                   "started by a large parent inherits the parent's peak.) It includes the allocator's and "
                   "the autograd graph's overheads; P·8 bytes is the size of one parameter vector, for scale.")
            if method == "getrusage":
                report("Here /proc could not reset the peak: ru_maxrss growth was used, a lower bound.")
        report()

    accuracy = [m for m in results["models"] if "accuracy" in m]
    if accuracy:
        report(f"## Accuracy at ε = {ACCURACY_DAMPING:g} (models with a dense reference)")
        report()
        rows = []
        for m in accuracy:
            a = m["accuracy"]
            if "error" in a:
                rows.append(TINY_DAMPING_TABLE.row([m["L"], m["h"], m["B"], m["P"], f"{a['damping']:g}", "—", a["error"][:14], "—", "—", "—", "—", "—", "—"]))
                continue
            rows.append(TINY_DAMPING_TABLE.row([
                m["L"], m["h"], m["B"], m["P"], f"{a['damping']:g}", a["negative"], sci(a["rel_error"]),
                sci(a["rel_error_refine0"]), sci(a["rel_residual"]), sci(a["dense_rel_residual"]),
                sci(a.get("rel_error_vs_refined")), sci(a.get("refined_dense_rel_residual")),
                sci(a.get("dense_error_vs_refined")),
            ]))  # fmt: skip
        report.table(TINY_DAMPING_TABLE, rows)
        report("err = relative error against the dense solve, with the default refinement policy and with refine=0; "
               "residual = relative residual of tallskinny's solution (default), dense residual = that of the dense "
               "solve (both with H applied by autograd); err vs refined = tallskinny's error against the dense solve "
               "with two steps of iterative refinement (LAPACK gerfs-style, residuals with the dense H), refined "
               "residual = that reference's residual, dense err vs refined = the plain dense solve's own error "
               "against it.")
        report()

    sweep_damping = dampings[0]
    for h, sweep_depths, key in ((32, depths, "h32"), (16, narrow, "h16")):
        if not sweep_depths:
            continue
        report(f"## Depth sweep: width {h}, batch 1, ε = {sweep_damping:g}")
        report()
        rows = depth_sweep(h, 1, sweep_depths, sweep_damping, repeats, args.device, log)
        results["sweeps"][key] = rows
        save()
        report.table(DEPTH_TABLE, [
            DEPTH_TABLE.row([r["L"], r["P"], ms(r["inverse_hvp_seconds"]), ms(r["hvp_seconds"]),
                             f"{r.get('ihvp_over_hvp', r['inverse_hvp_seconds'] / r['hvp_seconds']):.1f}"])
            for r in rows
        ])  # fmt: skip
        present = {r["L"] for r in rows}
        pairs = [(hi, lo) for hi, lo in (((1024, 256), (128, 32)) if key == "h32" else ((128, 32),)) if {hi, lo} <= present]
        if not pairs and len(rows) >= 2:
            pairs = [(rows[-1]["L"], rows[0]["L"])]
        for high, low in pairs:
            log(f"depth sweep h={h}: L={high} against L={low} in paired rounds")
            paired = paired_depth_ratio(h, 1, high, low, sweep_damping, repeats, args.device)
            results["sweeps"][f"{key}_paired_{high}_{low}"] = paired
            save()
            for name, k, pk in (("inverse_hvp", "inverse_hvp_seconds", "inverse_hvp"), ("HVP", "hvp_seconds", "hvp")):
                ratio = sweep_ratio(rows, k, high, low)
                if ratio is not None:
                    report(f"time(L={high}) / time(L={low}), {name}: {ratio:.2f} from the medians above, "
                           f"{paired[pk]:.2f} in paired rounds (linear in depth: {high / low:g})")
        if key == "h32" and len(rows) >= 2:
            report(plot_depth(rows, h, 1, sweep_damping, args.out / "chain_depth.png", args.device))
        report()

    elapsed = time.perf_counter() - started
    results["seconds"] = elapsed
    report(f"Total benchmark time: {elapsed:.0f} s.")
    save()
    (args.out / "chain.md").write_text("\n".join(report.lines) + "\n")
    print(f"(tables written to {args.out / 'chain.md'}, raw numbers to {args.out / 'chain.json'})")
    return results


if __name__ == "__main__":
    main()
