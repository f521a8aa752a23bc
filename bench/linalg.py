"""Benchmark: block-tridiagonal solves against scipy's banded LU and a dense solve.

Run as ``python bench/linalg.py`` (``--quick`` for a short run). One thread, float64.
For ``n`` blocks of size ``b`` (``N = n·b`` unknowns) it prints median-of-5 times,
after one warm-up run, of

* ``solve``: a solve with factors computed beforehand (one right-hand side);
* ``factor+solve``: ``op.factorize().solve(rhs)``;

for :class:`BlockTridiagonal` (block LU with partial pivoting) and
:class:`SymmetricBlockTridiagonal` (block LDLᵀ with delayed pivots), against
``scipy.linalg.solve_banded`` on the same matrix in LAPACK band storage (half-bandwidth
``2b − 1``), LAPACK ``gbtrs`` alone with ``gbtrf`` factors, and a dense
``torch.linalg.solve`` where ``N ≤ 10 000``. The test matrices are random,
block-diagonally dominant (and, for the symmetric one, indefinite).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one-thread BLAS for scipy/numpy too (before importing them)

import numpy as np
import scipy.linalg
import scipy.linalg.lapack as lapack
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tallskinny.linalg.testing import (  # noqa: E402
    random_block_tridiagonal,
    random_symmetric_block_tridiagonal,
)

DENSE_LIMIT = 10_000


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def banded_storage(op, half_bandwidth: int) -> np.ndarray:
    """LAPACK band storage ``ab[w + i − j, j] = M[i, j]`` built block by block (no dense matrix)."""
    w = half_bandwidth
    N = op.shape[0]
    ab = np.zeros((2 * w + 1, N))
    ro = op.row_offsets
    for i, j, block in op.stored_blocks():
        m = block.to_dense().numpy()
        rows = np.arange(ro[i], ro[i + 1])[:, None]
        cols = np.arange(ro[j], ro[j + 1])[None, :]
        ab[w + rows - cols, np.broadcast_to(cols, m.shape)] = m
    return ab


def bench_row(n: int, b: int, symmetric: bool, repeats: int, dense: bool) -> dict:
    gen = torch.Generator().manual_seed(n * 100 + b)
    sizes = [b] * n
    make = random_symmetric_block_tridiagonal if symmetric else random_block_tridiagonal
    op = make(sizes, gen)
    N = op.shape[0]
    rhs = torch.randn(N, generator=gen, dtype=torch.float64)

    factors = op.factorize()
    x = factors.solve(rhs)
    row = {
        "n": n,
        "b": b,
        "N": N,
        "kind": "LDLᵀ" if symmetric else "LU",
        "solve": median_time(lambda: factors.solve(rhs), repeats),
        "factor+solve": median_time(lambda: op.factorize().solve(rhs), repeats),
    }
    if symmetric:
        row["delayed"] = sum(d > 0 for d in factors.delayed)

    w = 2 * b - 1
    ab = banded_storage(op, w)
    r = rhs.numpy()
    row["solve_banded"] = median_time(lambda: scipy.linalg.solve_banded((w, w), ab, r), repeats)
    xb = scipy.linalg.solve_banded((w, w), ab, r)
    row["rel_diff"] = float(np.linalg.norm(x.numpy() - xb) / np.linalg.norm(xb))
    # gbtrs alone: LAPACK wants kl extra rows on top for the fill
    abx = np.zeros((3 * w + 1, N))
    abx[w:] = ab
    lub, piv, info = lapack.dgbtrf(abx, w, w)
    assert info == 0
    row["gbtrs"] = median_time(lambda: lapack.dgbtrs(lub, w, w, r, piv), repeats)

    if dense and N <= DENSE_LIMIT:
        M = op.to_dense()
        row["dense"] = median_time(lambda: torch.linalg.solve(M, rhs), repeats)
        del M
    return row


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1e3 * seconds:9.2f}"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n ∈ {100, 300, 1000}, no dense n = 300, b = 32 row")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per median (default 5)")
    parser.add_argument("--blocks", type=int, nargs="+", help="numbers of blocks n (replaces the default set)")
    parser.add_argument("--sizes", type=int, nargs="+", help="block sizes b (replaces 16 32)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(v < 1 for v in (args.blocks or []) + (args.sizes or [])):
        parser.error("--repeats, --blocks and --sizes must be positive")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> list[dict]:
    print(f"torch {torch.__version__}, scipy {scipy.__version__}, numpy {np.__version__}")
    print(f"torch.set_num_threads(1): torch uses {torch.get_num_threads()} thread; float64; "
          f"median of {args.repeats} runs after one warm-up; times in ms.")
    print("scipy/numpy BLAS threads: " + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")))
    print()

    configs = []
    ns = args.blocks or ((100, 300, 1000) if args.quick else (100, 300, 1000, 5000))
    for b in args.sizes or (16, 32):
        for n in ns:
            if args.quick and n == 300 and b == 32 and not args.blocks:
                continue
            configs.append((n, b))

    header = (
        f"{'n':>5} {'b':>3} {'N':>7} {'kind':>5} | {'solve':>9} {'fact+solve':>10} | "
        f"{'solve_band':>10} {'ratio':>6} {'gbtrs':>9} | {'dense':>10} {'speedup':>8} | {'rel diff':>8} {'delayed':>7}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n, b in configs:
        for symmetric in (False, True):
            row = bench_row(n, b, symmetric, args.repeats, dense=True)
            rows.append(row)
            ratio = row["factor+solve"] / row["solve_banded"]
            dense = row.get("dense")
            speed = f"{dense / row['factor+solve']:7.1f}×" if dense else "       —"
            print(
                f"{n:>5} {b:>3} {row['N']:>7} {row['kind']:>5} | {fmt_ms(row['solve'])} {fmt_ms(row['factor+solve']):>10} | "
                f"{fmt_ms(row['solve_banded']):>10} {ratio:5.2f}× {fmt_ms(row['gbtrs'])} | {fmt_ms(dense):>10} {speed} | "
                f"{row['rel_diff']:8.1e} {row.get('delayed', '—'):>7}",
                flush=True,
            )
    print()
    print("ratio   = (factor+solve) / solve_banded: target ≤ 3× at n = 1000, b = 32")
    print("speedup = dense torch.linalg.solve / (factor+solve): target ≥ 20× at n = 300")
    print("gbtrs   = LAPACK banded triangular solves alone (factors from gbtrf), to compare with 'solve'")
    print("delayed = blocks of the symmetric factorization that delayed eigen-directions to the next block")
    for row in rows:
        if row["n"] == 1000 and row["b"] == 32:
            ok = row["factor+solve"] <= 3 * row["solve_banded"]
            print(f"n=1000 b=32 {row['kind']}: {row['factor+solve'] / row['solve_banded']:.2f}× solve_banded "
                  f"({'meets' if ok else 'MISSES'} the 3× target)")
        if row["n"] == 300 and "dense" in row:
            ok = row["dense"] >= 20 * row["factor+solve"]
            print(f"n=300 b={row['b']} {row['kind']}: {row['dense'] / row['factor+solve']:.0f}× faster than dense "
                  f"({'meets' if ok else 'MISSES'} the 20× target)")
    return rows


if __name__ == "__main__":
    main()
