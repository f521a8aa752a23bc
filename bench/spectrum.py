"""Benchmark: exact spectral queries by inertia (issue 17) against Lanczos, power iteration and SLQ.

Run as ``python bench/spectrum.py`` (``--quick``: the small model only, fewer repeats).
One thread, float64, medians of ``--repeats`` runs after a warm-up; every ratio is measured
in the same run. Models: the tanh MLPs ``(L, h, B)`` of ``bench/chain.py`` (``L`` Linear
layers of width ``h``, input width ``h``, 10 classes, cross-entropy, batch ``B``):
``(8, 32, 4)`` (P = 7 722) and ``(64, 32, 1)`` (P = 66 858).

Two kinds of peer rows. **Emulated** (always; the controlled reference, on this file's
autograd HVPs with the gradient's graph built once): Lanczos with full reorthogonalization,
power iteration with deflation (PyHessian's top-k: tolerance 1e-3, at most 100 iterations
per eigenvalue) and stochastic Lanczos quadrature (1 probe, 100 steps). **The real
packages**, where they import (the bench-only extra ``pip install -e ".[peers]"``; their
rows are skipped, and said so, where they do not, or with ``--no-peers``):

* hessian-eigenthings 1.0.0a5: ``HessianOperator`` on the one batch (each product
  rebuilds the loss and its gradient graph, as the package does), ``lanczos`` at its
  defaults (``k = 5``: 10 steps, largest magnitude, reorthogonalized), and at its most
  accurate setting for the top-5 (``which="LA"``, ``reorthogonalize=True``, ``max_iter``
  the fewest steps that reach 1e-6 on all five: an oracle choice, found from one run of
  its ``lanczos_tridiagonal`` with the same start vector); the same without
  reorthogonalization (its default above 50 steps); ``deflated_power_iteration`` at its
  defaults; ``spectral_density`` at its defaults (10 runs, 80 steps).
* PyHessian 0.1: ``hessian(model, criterion, data=(X, y), cuda=False)``,
  ``.eigenvalues(top_n=5)`` at its defaults (``maxIter=100, tol=1e-3``) and at
  ``maxIter=1000, tol=1e-12`` (the top eigenvalue only: its normalization divides by
  ``‖v‖ + 1e-6``, so its Rayleigh quotients sit ``≈ 2e-6`` below ``λ``, and no setting
  reaches 1e-6), ``.density()`` at its defaults (1 probe, 100 steps). PyHessian creates
  its random vectors and its tridiagonal matrix in the default dtype: the bench sets
  ``torch.set_default_dtype(torch.float64)`` (the whole run, and again around every peer
  call), and its ``density`` calls ``torch.eig``, removed from PyTorch 1.9 on, so the
  bench puts ``eigh`` of the symmetric tridiagonal in its place for that call.

Power iteration and the default Lanczos (largest magnitude) target the five eigenvalues of
largest ``|λ|``; their errors are against those (exact, from ``eigvalsh``), the others'
against the five largest.

Measured, per model:

* one HVP (the unit "HVP-equivalents");
* top-5: ``chain.curvature`` + ``curv.eigvalsh(5)`` (the values; and with
  ``eigenvectors=True``, residual ``‖Hy − λy‖/‖H‖`` checked by autograd), against each Lanczos run to the first step where all five Ritz values are
  within 1e-6 (relative) of ours, timed at that step count, and the other settings' errors
  and HVPs; ours and every timed peer setting run in the same interleaved rounds, the
  ratios are medians of per-round ratios;
* the 5 eigenvalues nearest ``σ = 0.01·λ_max`` (Lanczos cannot target them), in HVPs,
  with eigenvectors and the values alone, and the floor of any count-certified answer:
  the factorization at ``σ`` and one count over the window (two more factorizations
  and their inertia checks);
* the 5 nearest 0, in the parameter blocks' null space (where the elimination breaks
  down at the target), in HVPs;
* the number of negative eigenvalues (below ``−τ``), in HVPs, and each SLQ's estimate of
  it (its weight below ``−τ``, times ``P``), with its HVPs;
* a 50-bin exact histogram next to SLQ's density in one PNG (the first model).

Output: Markdown on stdout; JSON and PNG in ``--out`` (default ``bench/out/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))

import tallskinny as ts  # noqa: E402,F401
from tallskinny import spectrum  # noqa: E402
from chain import ModelSpec, autograd_operator, build_problem  # noqa: E402

MODELS = ((8, 32, 4), (64, 32, 1))


def paired(fn, base, repeats):
    """``(median time of fn, median of the per-round ratios fn/base, fn's result)``: one
    ``base()`` and one ``fn()`` per round after a warm-up, so both see the same load."""
    fn(), base()
    times, ratios, out = [], [], None
    for _ in range(repeats):
        t = time.perf_counter()
        base()
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        ratios.append(times[-1] / t_base)
    return statistics.median(times), statistics.median(ratios), out


def med(fn, repeats):
    fn()  # warm-up
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# -- peers, on autograd HVPs -------------------------------------------------------------------
def lanczos(op, P, steps, gen, dtype=torch.float64):
    """Lanczos with full reorthogonalization: the Ritz values (ascending) after each step."""
    v = torch.randn(P, generator=gen, dtype=dtype)
    V = torch.empty(steps + 1, P, dtype=dtype)
    V[0] = v / v.norm()
    alpha, beta, history = [], [], []
    for j in range(steps):
        w = op(V[j])
        a = float(w @ V[j])
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        alpha.append(a)
        b = float(w.norm())
        beta.append(b)
        a, off = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta[:-1], dtype=torch.float64)
        T = torch.diag(a) + torch.diag(off, 1) + torch.diag(off, -1)  # float64 whatever the default dtype
        history.append(torch.linalg.eigvalsh(T))
        if b == 0:
            break
        V[j + 1] = w / b
    return history


def power_topk(op, P, k, gen, tol=1e-3, max_iter=100, dtype=torch.float64):
    """PyHessian's top-k: power iteration, deflated against the vectors found, stopped at a
    relative change ``< tol`` of the eigenvalue or ``max_iter``. Returns values and HVPs."""
    values, vectors, hvps = [], [], 0
    for _ in range(k):
        v = torch.randn(P, generator=gen, dtype=dtype)
        v /= v.norm()
        lam = None
        for _ in range(max_iter):
            for u in vectors:
                v -= (v @ u) * u
            v /= v.norm()
            Hv = op(v)
            hvps += 1
            new = float(Hv @ v)
            v = Hv / Hv.norm()
            if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                lam = new
                break
            lam = new
        values.append(lam)
        vectors.append(v)
    return sorted(values), hvps


# -- the real peers (bench-only extra; skipped where they do not import) ---------------------
def import_peers() -> dict:
    """``{"eigenthings": module | None, "pyhessian": module | None}``."""
    out = {}
    try:
        import hessian_eigenthings

        out["eigenthings"] = hessian_eigenthings
    except ImportError:
        out["eigenthings"] = None
    try:
        import pyhessian

        out["pyhessian"] = pyhessian
    except ImportError:
        out["pyhessian"] = None
    return out


def _eig_shim(T, eigenvectors=False):
    """``torch.eig`` as PyHessian 0.1 reads it (PyTorch < 1.9: eigenvalues as ``(n, 2)``
    real and imaginary parts, then the vectors), by ``eigh``: PyHessian passes its symmetric
    Lanczos tridiagonal."""
    w, V = torch.linalg.eigh(T)
    return torch.stack([w, torch.zeros_like(w)], dim=1), V


class PeerEnv:
    """Around a peer's call: float64 default dtype, the global random state forked and
    seeded, PyHessian's products counted and ``torch.eig`` shimmed; on exit the model's
    ``.grad`` (PyHessian leaves a graph there through ``loss.backward(create_graph=True)``,
    whose reference-cycle warning is silenced inside) cleared and everything put back."""

    def __init__(self, problem, seed: int):
        self.problem, self.seed, self.hvps = problem, seed, 0

    def __enter__(self):
        self._dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        self._rng = torch.random.fork_rng(devices=[])
        self._rng.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")  # PyHessian's; .grad cleared on exit
        torch.manual_seed(self.seed)
        self._eig = torch.eig
        torch.eig = _eig_shim
        self._module = sys.modules.get("pyhessian.hessian")
        if self._module is not None:
            original = self._module.hessian_vector_product

            def counted(*args, **kwargs):
                self.hvps += 1
                return original(*args, **kwargs)

            self._original = original
            self._module.hessian_vector_product = counted
        for p in self.problem.params:
            p.grad = None
        return self

    def __exit__(self, *exc):
        for p in self.problem.params:
            p.grad = None
        if self._module is not None:
            self._module.hessian_vector_product = self._original
        torch.eig = self._eig
        self._warnings.__exit__(*exc)
        self._rng.__exit__(*exc)
        torch.set_default_dtype(self._dtype)
        return False


def pyhessian_eigenvalues(pyhessian, problem, *, maxIter=100, tol=1e-3, top_n=5, seed=0):
    """PyHessian's power iteration with deflation (its constructor's forward and backward
    included): ``(eigenvalues, HVPs)``."""
    with PeerEnv(problem, seed) as env:
        H = pyhessian.hessian(problem.model, torch.nn.CrossEntropyLoss(), data=(problem.X, problem.y), cuda=False)
        values, _ = H.eigenvalues(maxIter=maxIter, tol=tol, top_n=top_n)
    return torch.tensor(values, dtype=torch.float64), env.hvps


def pyhessian_density(pyhessian, problem, *, iters=100, n_v=1, seed=0):
    """PyHessian's SLQ (its defaults: 1 Rademacher probe, 100 steps) as a
    :class:`tallskinny.spectrum.SLQ` (weights summing to ``P``): ``(slq, HVPs)``."""
    iters = min(iters, problem.P)
    with PeerEnv(problem, seed) as env:
        H = pyhessian.hessian(problem.model, torch.nn.CrossEntropyLoss(), data=(problem.X, problem.y), cuda=False)
        nodes, weights = H.density(iter=iters, n_v=n_v)
    nodes = torch.tensor([x for run in nodes for x in run], dtype=torch.float64)
    weights = torch.tensor([x for run in weights for x in run], dtype=torch.float64) * (problem.P / n_v)
    return spectrum.SLQ(nodes, weights), env.hvps


def eigenthings_operator(he, problem):
    """hessian-eigenthings' ``HessianOperator`` of the mean cross-entropy on the one batch."""
    return he.HessianOperator(problem.model, [(problem.X, problem.y)], he.supervised_loss(torch.nn.CrossEntropyLoss()))


def eigenthings_ritz_history(he, operator, steps, *, seed, reorthogonalize):
    """The Ritz values (ascending) after each step of hessian-eigenthings'
    ``lanczos_tridiagonal`` from ``lanczos(..., seed=seed)``'s start vector."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(operator.size, dtype=operator.dtype, generator=gen)
    td = he.lanczos_tridiagonal(operator, v0, steps, reorthogonalize=reorthogonalize)
    a, b = td.alphas, td.betas
    out = []
    for m in range(1, a.numel() + 1):
        T = torch.diag(a[:m])
        if m > 1:
            T = T + torch.diag(b[: m - 1], 1) + torch.diag(b[: m - 1], -1)
        out.append(torch.linalg.eigvalsh(T))
    return out


def eigenthings_density(he, operator, *, num_runs=10, steps=80, seed=0):
    """hessian-eigenthings' ``spectral_density`` (its defaults) as an SLQ: ``(slq, HVPs)``."""
    steps = min(steps, operator.size)
    with torch.random.fork_rng(devices=[]):
        res = he.spectral_density(operator, num_runs=num_runs, lanczos_steps=steps, seed=seed)
    keep = ~torch.isnan(res.raw_eigenvalues)
    nodes = res.raw_eigenvalues[keep]
    weights = res.raw_weights[keep] * (operator.size / num_runs)
    return spectrum.SLQ(nodes.to(torch.float64), weights.to(torch.float64)), num_runs * steps


def relative_error(found, exact, by_magnitude=False):
    """Largest relative error of the five ``found`` values of largest value (``by_magnitude``:
    largest ``|λ|``) against ``exact``, both sorted; ``inf`` when fewer than five."""
    found = torch.as_tensor(found, dtype=torch.float64).reshape(-1)
    k = exact.numel()
    if found.numel() < k:
        return float("inf")
    top = found[(found.abs() if by_magnitude else found).argsort(descending=True)[:k]].sort().values
    ex = exact.sort().values
    return float(((top - ex) / ex).abs().max())


def first_step_within(history, exact, tol=1e-6):
    """``(first step whose five largest Ritz values are within tol of exact, best error)``."""
    first, best = None, float("inf")
    for j, theta in enumerate(history):
        err = relative_error(theta, exact)
        best = min(best, err)
        if first is None and err <= tol:
            first = j + 1
    return first, best


def interleaved(fns: dict, repeats: int):
    """Every function once per round (after one warm-up round), in the same rounds:
    ``({name: median time}, {name: median of the per-round ratio first/name}, {name: last
    result}, {name: [times]})``, the first function being the reference (ours)."""
    names = list(fns)
    results = {n: fns[n]() for n in names}
    times = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t = time.perf_counter()
            results[n] = fns[n]()
            times[n].append(time.perf_counter() - t)
    ref = times[names[0]]
    ratios = {n: statistics.median(r / t for r, t in zip(ref, times[n])) for n in names}
    return {n: statistics.median(times[n]) for n in names}, ratios, results, times


# -- one model -------------------------------------------------------------------------------
def run_model(spec: ModelSpec, repeats: int, histogram: Path | None, log, peers: dict | None = None,
              max_steps: int = 300):
    peers = peers or {}
    he, ph = peers.get("eigenthings"), peers.get("pyhessian")
    problem = build_problem(spec)
    P = problem.P
    X, y, chain = problem.X, problem.y, problem.chain
    op = autograd_operator(problem, 0.0)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=gen, dtype=torch.float64)
    t_hvp, _ = med(lambda: op(v), max(5, repeats))
    log(f"{spec.label}: P = {P}, one HVP {t_hvp * 1e3:.2f} ms")
    row = {"model": [spec.L, spec.h, spec.B], "P": P, "hvp_s": t_hvp}

    # top-5: the values (the measure), and with eigenvectors (residual ≤ 1e-11·‖H‖)
    def top5_values():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "largest")

    def top5():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "largest", eigenvectors=True)

    values, vectors = top5()
    values_only_error = float(((top5_values() - values).abs() / values.abs()).max())
    curv = chain.curvature(X, y)
    both = torch.cat([values, curv.eigvalsh(5, "smallest")])
    magnitude5 = both[both.abs().argsort(descending=True)[:5]].sort().values  # what LM methods target
    Hv = torch.stack([op(vectors[:, i]) for i in range(5)], dim=1)
    norm = float(values.abs().max())
    residual = float((Hv - vectors * values).norm(dim=0).max()) / norm
    row.update(top5=values.tolist(), top5_magnitude=magnitude5.tolist(), top5_residual=residual)

    # Lanczos with full reorthogonalization (emulated, graph reused): steps to 1e-6 against ours
    steps_cap = min(P, max_steps)
    steps6, best = first_step_within(lanczos(op, P, steps_cap, torch.Generator().manual_seed(1)), values)
    row.update(lanczos_steps_1e6=steps6, lanczos_best_error=best)
    timed = {"ours": top5_values, "ours_vectors": top5}
    if steps6 is not None:
        timed["lanczos"] = lambda: lanczos(op, P, steps6, torch.Generator().manual_seed(1))

    if he is not None:
        he_op = eigenthings_operator(he, problem)
        t_heop, _ = med(lambda: he_op.matvec(v), max(5, repeats))
        row.update(eigenthings_matvec_s=t_heop)
        he_steps6, he_best = first_step_within(
            eigenthings_ritz_history(he, he_op, steps_cap, seed=0, reorthogonalize=True), values)
        nr_steps6, nr_best = first_step_within(
            eigenthings_ritz_history(he, he_op, steps_cap, seed=0, reorthogonalize=False), values)
        row.update(eigenthings_la_steps_1e6=he_steps6, eigenthings_la_best_error=he_best,
                   eigenthings_noreorth_steps_1e6=nr_steps6, eigenthings_noreorth_best_error=nr_best)
        timed["eigenthings_default"] = lambda: he.lanczos(he_op, k=5, seed=0)
        if he_steps6 is not None:
            timed["eigenthings_la"] = lambda: he.lanczos(he_op, k=5, which="LA", max_iter=he_steps6,
                                                         reorthogonalize=True, seed=0)
    if ph is not None:
        timed["pyhessian_default"] = lambda: pyhessian_eigenvalues(ph, problem, seed=0)

    t_of, ratio_of, out, times_of = interleaved(timed, repeats)

    def vectors_over(name):  # median per-round ratio, ours with eigenvectors / name
        return statistics.median(a / b for a, b in zip(times_of["ours_vectors"], times_of[name]))

    t_top, t_vec = t_of["ours"], t_of["ours_vectors"]
    row.update(top5_s=t_top, top5_hvps=t_top / t_hvp, top5_values_error=values_only_error,
               top5_vectors_s=t_vec, top5_vectors_hvps=t_vec / t_hvp)
    log(f"  top-5 values {[f'{x:.10g}' for x in values.tolist()]} in {t_top:.3f} s ({t_top / t_hvp:.0f} HVPs; "
        f"{values_only_error:.0e} from the values with eigenvectors)")
    log(f"  top-5 with eigenvectors in {t_vec:.3f} s ({t_vec / t_hvp:.0f} HVPs), residual {residual:.1e}·‖H‖")
    log(f"  (5 of largest |λ|: {[f'{x:.6g}' for x in magnitude5.tolist()]})")
    if steps6 is not None:
        row.update(lanczos_s=t_of["lanczos"], top5_ratio=ratio_of["lanczos"], top5_vectors_ratio=vectors_over("lanczos"))
        log(f"  Lanczos (emulated, full reorth.) reaches 1e-6 after {steps6} HVPs, {t_of['lanczos']:.3f} s: ours / it = {ratio_of['lanczos']:.2f} "
            f"(with eigenvectors {vectors_over('lanczos'):.2f}); best error in {steps_cap} steps {best:.1e}")
    else:
        log(f"  Lanczos (emulated, full reorth.) does not reach 1e-6 in {steps_cap} steps (best {best:.1e})")
    pw, pw_hvps = power_topk(op, P, 5, torch.Generator().manual_seed(2))
    pw_err = relative_error(pw, magnitude5, by_magnitude=True)
    row.update(power_error=pw_err, power_hvps=pw_hvps)
    log(f"  power iteration (emulated PyHessian top-k, tol 1e-3): error {pw_err:.1e} (vs the 5 of largest |λ|) after {pw_hvps} HVPs")

    if he is None:
        log("  hessian-eigenthings: not installed, its rows skipped (pip install -e '.[peers]')")
    else:
        log(f"  hessian-eigenthings: one HessianOperator product {t_heop * 1e3:.2f} ms = {t_heop / t_hvp:.2f} HVPs (it rebuilds the gradient graph)")
        r = out["eigenthings_default"]
        d_err = relative_error(r.eigenvalues, magnitude5, by_magnitude=True)
        row.update(eigenthings_default_error=d_err, eigenthings_default_hvps=r.iterations,
                   eigenthings_default_s=t_of["eigenthings_default"])
        log(f"    lanczos defaults (k=5: {r.iterations} steps, LM, reorth.): error {d_err:.1e} (vs the 5 of largest |λ|), {t_of['eigenthings_default']:.3f} s")
        if he_steps6 is not None:
            r = out["eigenthings_la"]
            la_err = relative_error(r.eigenvalues, values)
            row.update(eigenthings_la_s=t_of["eigenthings_la"], eigenthings_la_error=la_err,
                       top5_ratio_eigenthings=ratio_of["eigenthings_la"],
                       top5_vectors_ratio_eigenthings=vectors_over("eigenthings_la"))
            log(f"    lanczos LA, reorth., max_iter={he_steps6} (fewest to 1e-6): error {la_err:.1e}, {t_of['eigenthings_la']:.3f} s ({t_of['eigenthings_la'] / t_hvp:.0f} HVPs): ours / it = {ratio_of['eigenthings_la']:.2f} "
                f"(with eigenvectors {vectors_over('eigenthings_la'):.2f}); best error in {steps_cap} steps {he_best:.1e}")
        else:
            log(f"    lanczos LA, reorth.: does not reach 1e-6 in {steps_cap} steps (best {he_best:.1e})")
        log(f"    lanczos LA without reorth. (its default above 50 steps): "
            + (f"reaches 1e-6 after {nr_steps6} steps" if nr_steps6 else f"does not reach 1e-6 in {steps_cap} steps")
            + f" (best {nr_best:.1e})")
        t0 = time.perf_counter()
        r = he.deflated_power_iteration(he_op, k=5, seed=0)
        t_hp = time.perf_counter() - t0
        hp_err = relative_error(r.eigenvalues, magnitude5, by_magnitude=True)
        row.update(eigenthings_power_error=hp_err, eigenthings_power_hvps=r.iterations, eigenthings_power_s=t_hp)
        log(f"    deflated_power_iteration defaults (k=5, tol 1e-4, 100 its.): error {hp_err:.1e} (vs the 5 of largest |λ|) after {r.iterations} products, {t_hp:.2f} s (one run)")
    if ph is None:
        log("  PyHessian: not installed, its rows skipped (pip install -e '.[peers]')")
    else:
        ev, n = out["pyhessian_default"]
        p_err = relative_error(ev, magnitude5, by_magnitude=True)
        row.update(pyhessian_default_error=p_err, pyhessian_default_hvps=n, pyhessian_default_s=t_of["pyhessian_default"],
                   pyhessian_default_ratio=ratio_of["pyhessian_default"])
        log(f"  PyHessian eigenvalues(top_n=5) defaults (maxIter 100, tol 1e-3): error {p_err:.1e} (vs the 5 of largest |λ|) after {n} HVPs, {t_of['pyhessian_default']:.2f} s: ours / it = {ratio_of['pyhessian_default']:.2f}")
        t0 = time.perf_counter()
        ev, n = pyhessian_eigenvalues(ph, problem, maxIter=1000, tol=1e-12, top_n=1, seed=0)
        t_pb = time.perf_counter() - t0
        lam = float(magnitude5[magnitude5.abs().argmax()])
        pb_err = abs(float(ev[0]) - lam) / abs(lam)
        row.update(pyhessian_best_error=pb_err, pyhessian_best_hvps=n, pyhessian_best_s=t_pb)
        log(f"  PyHessian eigenvalues(top_n=1, maxIter 1000, tol 1e-12): λ_max error {pb_err:.1e} after {n} HVPs, {t_pb:.2f} s (one run): "
            "the +1e-6 in its normalization puts the Rayleigh quotient ~2e-6 low, so no setting reaches 1e-6")

    # 5 nearest an interior σ
    sigma = 0.01 * float(values[-1])

    def nearest():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "nearest", near=sigma, eigenvectors=True)

    t_near, near_hvps, (nv, nvec) = paired(nearest, lambda: op(v), repeats)
    Hn = torch.stack([op(nvec[:, i]) for i in range(5)], dim=1)
    nres = float((Hn - nvec * nv).norm(dim=0).max()) / norm
    row.update(sigma=sigma, nearest=nv.tolist(), nearest_s=t_near, nearest_hvps=near_hvps, nearest_residual=nres)
    log(f"  5 nearest σ = {sigma:.4g}: {[f'{x:.10g}' for x in nv.tolist()]} in {t_near:.3f} s ({near_hvps:.1f} HVPs, paired), residual {nres:.1e}·‖H‖ (no peer targets an interior σ)")

    def nearest_values():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "nearest", near=sigma)

    # what any count-certified answer pays besides its search: the pole's factorization
    # and a count over the window of the 5 found (two factorizations, their inertia
    # checks); the window a little wider than the 5th distance, as eigvalsh takes it
    reach = 1.25 * float((nv - sigma).abs().max())

    def certificate():
        curv = chain.curvature(X, y)
        curv.factorize(shift=sigma)
        return curv.eigenvalue_count(sigma - reach, sigma + reach)

    t_vals, vals_hvps, nvals = paired(nearest_values, lambda: op(v), repeats)
    t_cert, cert_hvps, in_window = paired(certificate, lambda: op(v), repeats)
    row.update(nearest_values_hvps=vals_hvps, nearest_values_s=t_vals, certificate_hvps=cert_hvps, certificate_s=t_cert,
               certificate_count=in_window)
    log(f"    the values alone: {vals_hvps:.1f} HVPs (max difference {float((nvals - nv).abs().max()):.1e}); "
        f"the certificate's floor (the pole's factorization and one count over the window, {in_window} eigenvalues "
        f"within {reach:.3g} of σ): {cert_hvps:.1f} HVPs")

    # 5 nearest 0: on the parameter blocks' null space, where the elimination breaks down
    def nearest_zero():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "nearest", near=0.0, eigenvectors=True)

    t_zero, zero_hvps, (zv, zvec) = paired(nearest_zero, lambda: op(v), repeats)
    Hz = torch.stack([op(zvec[:, i]) for i in range(5)], dim=1)
    zres = float((Hz - zvec * zv).norm(dim=0).max()) / norm
    row.update(nearest_zero=zv.tolist(), nearest_zero_s=t_zero, nearest_zero_hvps=zero_hvps, nearest_zero_residual=zres)
    log(f"  5 nearest 0 (the null space): max |λ| {float(zv.abs().max()):.1e} in {t_zero:.3f} s ({zero_hvps:.1f} HVPs, paired), residual {zres:.1e}·‖H‖")

    # negative count
    def negatives():
        curv = chain.curvature(X, y)
        return curv.negative_count(spectrum.edge_tolerance(curv))  # below −τ

    t_neg, neg_hvps, n_neg = paired(negatives, lambda: op(v), max(5, repeats))
    tau = spectrum.edge_tolerance(chain.curvature(X, y))
    row.update(negative=n_neg, negative_s=t_neg, negative_hvps=neg_hvps, tau=tau)
    log(f"  negative eigenvalues (below −τ = {-tau:.2e}): {n_neg} in {t_neg * 1e3:.1f} ms ({neg_hvps:.2f} HVPs, paired; curvature() included)")

    # SLQ: the emulation and the peers; each one's estimate of the negative count
    estimates = {}
    t0 = time.perf_counter()
    estimates["slq"] = (spectrum.slq(op, P, probes=1, steps=100, seed=3), min(100, P))  # on the autograd HVPs
    t_slq = time.perf_counter() - t0
    times = {"slq": t_slq}
    if ph is not None:
        t0 = time.perf_counter()
        estimates["pyhessian_slq"] = pyhessian_density(ph, problem, seed=3)
        times["pyhessian_slq"] = time.perf_counter() - t0
    if he is not None:
        t0 = time.perf_counter()
        estimates["eigenthings_slq"] = eigenthings_density(he, he_op, seed=3)
        times["eigenthings_slq"] = time.perf_counter() - t0
    names = {"slq": "SLQ (emulated, 1 Gaussian probe, 100 steps)", "pyhessian_slq": "PyHessian density() (1 probe, 100 steps)",
             "eigenthings_slq": "hessian-eigenthings spectral_density() (10 runs, 80 steps)"}
    for key, (est, n) in estimates.items():
        neg = float(est.weights[est.nodes < -tau].sum())
        row.update({f"{key}_negative": neg, f"{key}_s": times[key], f"{key}_products": n})
        log(f"  {names[key]}: estimates {neg:.0f} negative (exact {n_neg}), {n} products, {times[key]:.2f} s = {times[key] / t_hvp:.0f} HVPs")

    if histogram is not None:
        curv = chain.curvature(X, y)
        lo, hi = spectrum.spectral_bounds(curv)
        edges = torch.linspace(lo, hi, 51)
        t0 = time.perf_counter()
        hist = curv.spectral_histogram(edges)
        t_hist = time.perf_counter() - t0
        width = 0.01 * (hi - lo)
        grid = torch.linspace(lo, hi, 1000)
        dens = estimates["slq"][0].density(grid, width)
        row.update(histogram=hist.counts.tolist(), zeros=hist.zeros, histogram_s=t_hist)
        log(f"  50-bin exact histogram in {t_hist:.2f} s ({hist.zeros} zeros apart)")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4.5))
            spectrum.plot_histogram(hist, ax, density=(grid.tolist(), dens.tolist()))
            bin_width = float(edges[1] - edges[0])
            for key, color in (("pyhessian_slq", "C2"), ("eigenthings_slq", "C4")):
                if key in estimates:
                    d = estimates[key][0].density(grid, width) * bin_width
                    ax.plot(grid.tolist(), d.tolist(), color=color, linestyle="--", label=names[key] + " (× bin width)")
            ax.legend(fontsize=7)
            ax.set_title(f"tanh MLP {spec.label}, P = {P}: exact counts (inertia) vs SLQ\n{hist.zeros} eigenvalues in ±{hist.tolerance:.1e} not drawn")
            fig.tight_layout()
            fig.savefig(histogram, dpi=120)
            plt.close(fig)
            log(f"  wrote {histogram}")
        except ImportError:
            log("  (matplotlib missing: no PNG)")
    return row


def _fmt_steps(r, key_steps, key_s, key_ratio, key_best):
    if r.get(key_steps) is None:
        return f"not in 300 steps (best {r[key_best]:.1e})" if key_best in r else "—"
    vectors = r.get(key_ratio.replace("top5_ratio", "top5_vectors_ratio"))
    return f"{r[key_steps]} steps, {r[key_s]:.3f} s; ours / it {r[key_ratio]:.2f}" + (f" (with eigenvectors {vectors:.2f})" if vectors else "")


def summary(rows) -> str:
    """The comparison table, models as columns."""
    def cells(fn):
        out = []
        for r in rows:
            try:
                out.append(fn(r))
            except KeyError:
                out.append("—")
        return "| " + " | ".join(out) + " |"

    head = "| | " + " | ".join(f"{tuple(r['model'])}, P = {r['P']}" for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    add = lambda label, fn: lines.append(f"| {label} " + cells(fn))  # noqa: E731
    add("one HVP (autograd, graph reused)", lambda r: f"{r['hvp_s'] * 1e3:.2f} ms")
    add("top-5 values, ours (curvature + `eigvalsh(5)`)", lambda r: f"{r['top5_s']:.3f} s = {r['top5_hvps']:.0f} HVPs")
    add("top-5 with eigenvectors, ours (`eigenvectors=True`)", lambda r: f"{r['top5_vectors_s']:.3f} s = {r['top5_vectors_hvps']:.0f} HVPs, residual {r['top5_residual']:.0e}·‖H‖")
    add("Lanczos (emulated, full reorth.) to 1e-6", lambda r: _fmt_steps(r, "lanczos_steps_1e6", "lanczos_s", "top5_ratio", "lanczos_best_error"))
    add("hessian-eigenthings `lanczos`, LA, reorth., fewest steps to 1e-6", lambda r: _fmt_steps(r, "eigenthings_la_steps_1e6", "eigenthings_la_s", "top5_ratio_eigenthings", "eigenthings_la_best_error"))
    add("the same without reorth. (its default above 50 steps)", lambda r: f"{r['eigenthings_noreorth_steps_1e6']} steps" if r["eigenthings_noreorth_steps_1e6"] else f"not in 300 steps (best {r['eigenthings_noreorth_best_error']:.1e})")
    add("hessian-eigenthings `lanczos` defaults (k=5: 10 steps, LM) †", lambda r: f"error {r['eigenthings_default_error']:.1e}, {r['eigenthings_default_s']:.3f} s")
    add("hessian-eigenthings `deflated_power_iteration` defaults †", lambda r: f"error {r['eigenthings_power_error']:.1e} after {r['eigenthings_power_hvps']} products")
    add("PyHessian `eigenvalues(top_n=5)` defaults †", lambda r: f"error {r['pyhessian_default_error']:.1e} after {r['pyhessian_default_hvps']} HVPs, {r['pyhessian_default_s']:.2f} s; ours / it {r['pyhessian_default_ratio']:.2f}")
    add("PyHessian `maxIter=1000, tol=1e-12`, λ_max only", lambda r: f"error {r['pyhessian_best_error']:.1e} after {r['pyhessian_best_hvps']} HVPs (never 1e-6)")
    add("power iteration (emulated PyHessian) †", lambda r: f"error {r['power_error']:.1e} after {r['power_hvps']} HVPs")
    add("5 nearest σ = 0.01·λ_max, ours (peers: no interior target)", lambda r: f"{r['nearest_hvps']:.0f} HVPs, residual {r['nearest_residual']:.0e}·‖H‖")
    add("  the values alone / the certificate's floor (pole + one count)",
        lambda r: f"{r['nearest_values_hvps']:.0f} / {r['certificate_hvps']:.0f} HVPs")
    add("5 nearest 0 (the null space), ours", lambda r: f"{r['nearest_zero_hvps']:.0f} HVPs, residual {r['nearest_zero_residual']:.0e}·‖H‖")
    add("negatives below −τ, ours (curvature included)", lambda r: f"{r['negative']} in {r['negative_hvps']:.1f} HVPs")
    for key, label in (("slq", "SLQ (emulated), estimate"), ("pyhessian_slq", "PyHessian `density()`, estimate"),
                       ("eigenthings_slq", "hessian-eigenthings `spectral_density()`, estimate")):
        add(label, lambda r, k=key: f"{r[k + '_negative']:.0f} ({r[k + '_products']} products, {r[k + '_s'] / r['hvp_s']:.0f} HVPs)")
    lines.append("")
    lines.append("† against the five eigenvalues of largest |λ| (what the method targets); the others against the five largest.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--no-peers", action="store_true", help="skip PyHessian and hessian-eigenthings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    args.out.mkdir(parents=True, exist_ok=True)
    models = MODELS[:1] if args.quick else MODELS
    repeats = 2 if args.quick else args.repeats
    peers = {} if args.no_peers else import_peers()
    missing = [name for name in ("eigenthings", "pyhessian") if peers.get(name) is None]
    if missing:
        print(f"(peers skipped: {', '.join(missing)}" + (" — --no-peers" if args.no_peers else " not installed; pip install -e '.[peers]'") + ")")
    rows = []
    for i, m in enumerate(models):
        rows.append(run_model(ModelSpec(*m), repeats, args.out / "spectrum_histogram.png" if i == 0 else None, print, peers))
        (args.out / "spectrum.json").write_text(json.dumps(rows, indent=1))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
