"""Benchmark: mixed-precision ``inverse_hvp`` (float32 factors, float64 refinement) against
the float64 path, paired in one run (issue 18).

Run as ``python bench/mixed.py`` (``--models L,h,B …``, ``--dampings ε …``, ``--repeats N``).
One thread. Models: ``bench/chain.py``'s tanh MLPs (float64). For each model and damping,
interleaved rounds of ``chain.inverse_hvp(X, y, b, damping=ε, precision=p)`` for
``p = "full"`` and ``"mixed"``; it prints the medians, the median of the per-round ratios
mixed/full, which path the mixed factorization ended on (``mixed`` or ``full`` after a
fallback) with its refinement steps, the normwise backward error of both solutions
(``‖b − (H+εI)x‖ / (‖H‖·‖x‖ + ‖b‖)`` with ``‖H‖`` bounded below by the curvature's
checks, so an overestimate) and their relative difference (the float64 path is the
reference: these models have ``P ≈ 16 000``, beyond a dense solve).
"""

from __future__ import annotations

import argparse
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

from chain import ModelSpec, build_problem, parse_model  # noqa: E402

MODELS = (ModelSpec(16, 32, 32), ModelSpec(16, 32, 8))
DAMPINGS = (1e-3, 1e-1)


def backward_error(curv, x, b, damping) -> float:
    r = b - curv.hvp(x) - damping * x
    norm = max(curv.checks.norm_bound, 0.0) + damping
    return float(r.norm() / (norm * x.norm() + b.norm()))


def measure(spec: ModelSpec, damping: float, repeats: int) -> dict:
    problem = build_problem(spec)
    chain, X, y, b = problem.chain, problem.X, problem.y, problem.b

    def run(precision):
        return chain.inverse_hvp(X, y, b, damping=damping, precision=precision)

    times = {"full": [], "mixed": []}
    run("full"), run("mixed")  # warm-up
    for _ in range(repeats):
        for precision in ("full", "mixed"):
            start = time.perf_counter()
            run(precision)
            times[precision].append(time.perf_counter() - start)
    ratio = statistics.median(m / f for m, f in zip(times["mixed"], times["full"]))
    # accuracy and the path taken, on one curvature per precision
    out = {}
    for precision in ("full", "mixed"):
        curv = chain.curvature(X, y)
        fact = curv.factorize(damping, precision=precision)
        x = fact.solve(b)
        out[precision] = (x, curv, fact.precision, curv.checks.refinements)
    x_full, curv_full = out["full"][:2]
    x_mixed, curv_mixed, path, steps = out["mixed"]
    return {
        "model": spec.label,
        "damping": damping,
        "full_s": statistics.median(times["full"]),
        "mixed_s": statistics.median(times["mixed"]),
        "ratio": ratio,
        "path": path,
        "steps": steps,
        "bwd_full": backward_error(curv_full, x_full, b, damping),
        "bwd_mixed": backward_error(curv_mixed, x_mixed, b, damping),
        "diff": float((x_mixed - x_full).norm() / x_full.norm()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=parse_model, default=list(MODELS))
    parser.add_argument("--dampings", nargs="+", type=float, default=list(DAMPINGS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | ε | float64 path | mixed | mixed/float64 | mixed ended on | refinements | backward error float64 | backward error mixed | ‖x_mixed − x_64‖/‖x_64‖ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.models:
        for damping in args.dampings:
            r = measure(spec, damping, args.repeats)
            print(
                f"| {r['model']} | {damping:g} | {r['full_s']:.3f} s | {r['mixed_s']:.3f} s | {r['ratio']:.2f} | "
                f"{r['path']} | {r['steps']} | {r['bwd_full']:.1e} | {r['bwd_mixed']:.1e} | {r['diff']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
