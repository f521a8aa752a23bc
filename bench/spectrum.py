"""Benchmark: exact spectral queries by inertia (issue 17) against Lanczos, power iteration and SLQ.

Run as ``python bench/spectrum.py`` (``--quick``: the small model only, fewer repeats).
One thread, float64, medians of ``--repeats`` runs after a warm-up; every ratio is measured
in the same run. Models: the tanh MLPs ``(L, h, B)`` of ``bench/chain.py`` (``L`` Linear
layers of width ``h``, input width ``h``, 10 classes, cross-entropy, batch ``B``):
``(8, 32, 4)`` (P = 7 722) and ``(64, 32, 1)`` (P = 66 858).

The peers (PyHessian, hessian-eigenthings) are not installed here; their methods are
written in this file on the same autograd HVPs (the model's double backward, graph built
once): **Lanczos with full reorthogonalization** (hessian-eigenthings' exact setting),
**power iteration with deflation** (PyHessian's top-k: tolerance 1e-3, at most 100
iterations per eigenvalue) and **stochastic Lanczos quadrature** (PyHessian's density:
``n_v`` probes, ``m`` steps, Gaussian broadening).

Measured, per model:

* one HVP (the unit "HVP-equivalents");
* top-5: ``chain.curvature`` + ``curv.eigvalsh(5)`` (residual ``‖Hy − λy‖/‖H‖`` checked by
  autograd), against Lanczos with full reorthogonalization run to the first step where
  all five Ritz values are within 1e-6 (relative) of ours, timed at that step count, and
  power iteration's error and HVPs;
* the 5 eigenvalues nearest ``σ = 0.01·λ_max`` (Lanczos cannot target them), in HVPs;
* the number of negative eigenvalues (below ``−τ``), in HVPs, and SLQ's estimate of it;
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
        T = torch.diag(torch.tensor(alpha)) + torch.diag(torch.tensor(beta[:-1]), 1) + torch.diag(torch.tensor(beta[:-1]), -1)
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


# -- one model -------------------------------------------------------------------------------
def run_model(spec: ModelSpec, repeats: int, histogram: Path | None, log):
    problem = build_problem(spec)
    P = problem.P
    X, y, chain = problem.X, problem.y, problem.chain
    op = autograd_operator(problem, 0.0)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=gen, dtype=torch.float64)
    t_hvp, _ = med(lambda: op(v), max(5, repeats))
    log(f"{spec.label}: P = {P}, one HVP {t_hvp * 1e3:.2f} ms")
    row = {"model": [spec.L, spec.h, spec.B], "P": P, "hvp_s": t_hvp}

    # top-5
    def top5():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "largest", eigenvectors=True)

    t_top, (values, vectors) = med(top5, repeats)
    Hv = torch.stack([op(vectors[:, i]) for i in range(5)], dim=1)
    norm = float(values.abs().max())
    residual = float((Hv - vectors * values).norm(dim=0).max()) / norm
    row.update(top5=values.tolist(), top5_s=t_top, top5_hvps=t_top / t_hvp, top5_residual=residual)
    log(f"  top-5 {[f'{x:.10g}' for x in values.tolist()]} in {t_top:.3f} s ({t_top / t_hvp:.0f} HVPs), residual {residual:.1e}·‖H‖")

    # Lanczos with full reorthogonalization: steps to 1e-6 against ours, then timed at that many
    max_steps = min(P, 300)
    history = lanczos(op, P, max_steps, torch.Generator().manual_seed(1))
    steps6 = None
    err_at = {}
    for j, theta in enumerate(history):
        if theta.numel() < 5:
            continue
        err = float(((theta[-5:] - values) / values).abs().max())
        err_at[j + 1] = err
        if steps6 is None and err <= 1e-6:
            steps6 = j + 1
    best10 = min(err_at.values()) if err_at else None
    row.update(lanczos_steps_1e6=steps6, lanczos_best_error=best10)
    if steps6 is not None:
        t_lz, _ = med(lambda: lanczos(op, P, steps6, torch.Generator().manual_seed(1)), max(1, repeats // 2))
        row.update(lanczos_s=t_lz, top5_ratio=t_top / t_lz)
        log(f"  Lanczos (full reorth.) reaches 1e-6 after {steps6} HVPs, {t_lz:.3f} s: ours / Lanczos = {t_top / t_lz:.2f}; best error in {max_steps} steps {best10:.1e}")
    else:
        log(f"  Lanczos (full reorth.) does not reach 1e-6 in {max_steps} steps (best {best10:.1e})")
    pw, pw_hvps = power_topk(op, P, 5, torch.Generator().manual_seed(2))
    pw_err = float(((torch.tensor(pw) - values) / values).abs().max())
    row.update(power_error=pw_err, power_hvps=pw_hvps)
    log(f"  power iteration (PyHessian's top-k, tol 1e-3): error {pw_err:.1e} after {pw_hvps} HVPs")

    # 5 nearest an interior σ
    sigma = 0.01 * float(values[-1])

    def nearest():
        curv = chain.curvature(X, y)
        return curv.eigvalsh(5, "nearest", near=sigma, eigenvectors=True)

    t_near, near_hvps, (nv, nvec) = paired(nearest, lambda: op(v), repeats)
    Hn = torch.stack([op(nvec[:, i]) for i in range(5)], dim=1)
    nres = float((Hn - nvec * nv).norm(dim=0).max()) / norm
    row.update(sigma=sigma, nearest=nv.tolist(), nearest_s=t_near, nearest_hvps=near_hvps, nearest_residual=nres)
    log(f"  5 nearest σ = {sigma:.4g}: {[f'{x:.10g}' for x in nv.tolist()]} in {t_near:.3f} s ({near_hvps:.1f} HVPs, paired), residual {nres:.1e}·‖H‖")

    # negative count
    def negatives():
        curv = chain.curvature(X, y)
        return curv.negative_count(spectrum.edge_tolerance(curv))  # below −τ

    t_neg, neg_hvps, n_neg = paired(negatives, lambda: op(v), max(5, repeats))
    row.update(negative=n_neg, negative_s=t_neg, negative_hvps=neg_hvps)
    log(f"  negative eigenvalues: {n_neg} in {t_neg * 1e3:.1f} ms ({neg_hvps:.2f} HVPs, paired; curvature() included)")

    if histogram is not None:
        curv = chain.curvature(X, y)
        lo, hi = spectrum.spectral_bounds(curv)
        edges = torch.linspace(lo, hi, 51)
        t0 = time.perf_counter()
        hist = curv.spectral_histogram(edges)
        t_hist = time.perf_counter() - t0
        probes, steps = 1, 100  # PyHessian's defaults
        t0 = time.perf_counter()
        est = spectrum.slq(op, P, probes=probes, steps=steps, seed=3)  # on the autograd HVPs
        t_slq = time.perf_counter() - t0
        width = 0.01 * (hi - lo)
        grid = torch.linspace(lo, hi, 1000)
        dens = est.density(grid, width)
        slq_neg = float(est.weights[est.nodes < -1e-8].sum())
        row.update(histogram=hist.counts.tolist(), zeros=hist.zeros, histogram_s=t_hist, slq_s=t_slq, slq_negative=slq_neg)
        log(f"  50-bin exact histogram in {t_hist:.2f} s ({hist.zeros} zeros apart); SLQ ({probes} probe, {steps} steps) {t_slq:.2f} s, estimates {slq_neg:.0f} negative (exact: {n_neg})")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4.5))
            spectrum.plot_histogram(hist, ax, density=(grid.tolist(), dens.tolist()))
            ax.set_title(f"tanh MLP {spec.label}, P = {P}: exact counts (inertia) vs SLQ\n{hist.zeros} eigenvalues in ±{hist.tolerance:.1e} not drawn")
            fig.tight_layout()
            fig.savefig(histogram, dpi=120)
            plt.close(fig)
            log(f"  wrote {histogram}")
        except ImportError:
            log("  (matplotlib missing: no PNG)")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    args.out.mkdir(parents=True, exist_ok=True)
    models = MODELS[:1] if args.quick else MODELS
    repeats = 2 if args.quick else args.repeats
    rows = []
    for i, m in enumerate(models):
        rows.append(run_model(ModelSpec(*m), repeats, args.out / "spectrum_histogram.png" if i == 0 else None, print))
    (args.out / "spectrum.json").write_text(json.dumps(rows, indent=1))
    print("\n| model | P | top-5 (ours / Lanczos to 1e-6) | 5 nearest σ (HVPs) | negatives (HVPs) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['top5_ratio']:.2f}" if "top5_ratio" in r else "n/a"
        print(f"| {tuple(r['model'])} | {r['P']} | {ratio} | {r['nearest_hvps']:.1f} | {r['negative']} in {r['negative_hvps']:.2f} |")


if __name__ == "__main__":
    main()
