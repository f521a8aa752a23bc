"""Run the differential fuzzer wide: ``python tests/fuzz/wide.py --cases 5000 --jobs 2``
(``--family runs``: the chains of ``make_run_case``, runs of square layers at batch 1;
``--family spectra``: ``make_case``'s chains (float64, one seed in eight float32) through
the spectral queries, ``tests/fuzz/spectra.py``).

Prints the number of cases run (by kind, dtype and verdict), the worst error/tolerance
ratio of every quantity with its case, the cases that came with an ``AccuracyWarning``,
and every failure of the contract (``tests/fuzz/chains.py``); exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import collections
import math
import multiprocessing
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _run(job: tuple[str, int]):
    import torch

    from chains import check_case, make_case, make_run_case
    from spectra import check_spectrum, spectrum_dtype

    family, seed = job
    torch.set_num_threads(1)
    try:
        if family == "spectra":
            case, check = make_case(seed, dtype=spectrum_dtype(seed)), check_spectrum
        else:
            case, check = (make_run_case if family == "runs" else make_case)(seed), check_case
        t = time.perf_counter()
        report = check(case)
        return seed, case.kind, str(case.dtype), report, time.perf_counter() - t, None
    except Exception:  # a crash is a failure of its own
        return seed, "?", "?", None, 0.0, traceback.format_exc(limit=8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--show", type=int, default=40, help="failures printed at most")
    parser.add_argument(
        "--family",
        choices=["chains", "runs", "spectra"],
        default="chains",
        help="make_case, make_run_case, or make_case's chains (float64; float32 where seed % 8 == 7) through the spectral queries",
    )
    args = parser.parse_args(argv)
    seeds = range(args.start, args.start + args.cases)
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(_run, [(args.family, seed) for seed in seeds], chunksize=4)
    counts = collections.Counter()
    worst: dict = {}
    warned, failures, crashes, unconverged = [], [], [], []
    slowest = 0.0
    for seed, kind, dtype, report, dt, crash in results:
        slowest = max(slowest, dt)
        if crash is not None:
            crashes.append((seed, crash))
            continue
        counts[(kind, dtype, "singular" if report.singular else "factored")] += 1
        for name, score in report.scores.items():
            if name in report.warned:
                continue
            if not math.isinf(score) and score > worst.get(name, (-1, None))[0]:
                worst[name] = (score, report)
        if report.warned:
            warned.append(report)
        if report.failures:
            failures.append(report)
        if report.unconverged:
            unconverged.append(report)
    print(f"{len(results)} cases in {time.perf_counter() - t0:.0f} s ({args.jobs} jobs; slowest case {slowest:.1f} s)")
    for key, n in sorted(counts.items()):
        print(f"  {' '.join(key):32s} {n}")
    print("worst error / tolerance (≤ 1 passes), cases without a warning:")
    for name, (score, report) in sorted(worst.items()):
        print(f"  {name:12s} {score:9.2e}  cond {report.cond:8.1e}  {report.case}")
    print(f"{len(warned)} cases with an AccuracyWarning", end="")
    print(": " + ", ".join(sorted({q for r in warned for q in r.warned})) if warned else "")
    for r in warned[: args.show // 2]:
        print(f"  warned {sorted(r.warned)} cond {r.cond:.1e}: {r.case}")
    if unconverged:
        print(f"{len(unconverged)} cases with a search that did not converge (ConvergenceError, no dense fallback)")
        for r in unconverged[: args.show // 2]:
            print(f"  unconverged P={r.P}: {r.case}\n      " + "; ".join(r.unconverged))
    print(f"{len(failures)} failures, {len(crashes)} crashes")
    for r in failures[: args.show]:
        print(f"  FAIL P={r.P} cond={r.cond:.1e} min|λ|/max|λ|={r.min_ratio:.1e}: {r.case}\n      " + "; ".join(r.failures))
    for seed, tb in crashes[: args.show]:
        print(f"  CRASH seed={seed}\n{tb}")
    return 1 if failures or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
