"""Benchmark: LU solves through the row-major factor (``tallskinny.linalg.lu.LUFactors``)
against ``torch.linalg.lu_solve`` on the same factors.

Run as ``python bench/lu.py``. One thread; for each order ``n``, right-hand-side count
``k`` and dtype, the medians of 21 interleaved rounds after a warm-up, the median of the
per-round ratios, and the
difference between the two answers relative to ``lu_solve``'s (rounding only:
the same substitutions, in another kernel order).

``python bench/lu.py --layouts``: the product ``Aᵀx`` of a row-major ``n × n`` matrix with
a solve's answer ``x`` (``n × k``) as LAPACK leaves it (column-major), as
``linalg.lu.in_layout_of`` returns it (row-major), and computed wide as ``(xᵀA)ᵀ``
(``linalg.thin.thin_product``), float64, in interleaved rounds.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import median_ratio, paired_times  # noqa: E402
from tallskinny.linalg.lu import LUFactors  # noqa: E402


def layouts() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("|    n |    k | Aᵀx, x column-major | Aᵀx, x row-major | (xᵀA)ᵀ (thin_product) | col / row | row / wide |")
    print("|-----:|-----:|--------------------:|-----------------:|----------------------:|----------:|-----------:|")
    for n in (128, 256, 512, 1024):
        for k in (2, 7, 12, 32, 128):
            A = torch.randn(n, n, generator=gen, dtype=torch.float64)
            x_col = torch.randn(k, n, generator=gen, dtype=torch.float64).mT
            x_row = x_col.contiguous()
            col, row, wide = paired_times([lambda: A.mT @ x_col, lambda: A.mT @ x_row, lambda: (x_row.mT @ A).mT], 21)
            print(f"| {n:4d} | {k:4d} | {statistics.median(col) * 1e6:16.1f} µs | {statistics.median(row) * 1e6:13.1f} µs "
                  f"| {statistics.median(wide) * 1e6:18.1f} µs | {median_ratio(col, row):9.2f} | {median_ratio(row, wide):10.2f} |")


def main() -> None:
    if "--layouts" in sys.argv[1:]:
        layouts()
        return
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("|    n |    k | dtype   | lu_solve | LUFactors | speed-up | rel. difference |")
    print("|-----:|-----:|---------|---------:|----------:|---------:|----------------:|")
    for n in (64, 128, 256, 512, 1024):
        for k in sorted({1, 8, 64, n}):
            for dtype in (torch.float64, torch.float32):
                A = torch.randn(n, n, generator=gen, dtype=dtype)
                B = torch.randn(n, k, generator=gen, dtype=dtype)
                lu, piv = torch.linalg.lu_factor(A)
                factors = LUFactors(lu, piv)
                ref = torch.linalg.lu_solve(lu, piv, B)
                diff = float((factors.solve(B) - ref).norm() / ref.norm())
                ref_times, new_times = paired_times([lambda: torch.linalg.lu_solve(lu, piv, B), lambda: factors.solve(B)], 21)
                t_ref, t_new = statistics.median(ref_times), statistics.median(new_times)
                print(f"| {n:4d} | {k:4d} | {str(dtype)[6:]:7s} | {t_ref * 1e3:6.2f} ms | {t_new * 1e3:6.2f} ms "
                      f"| {median_ratio(ref_times, new_times):7.2f}× | {diff:15.1e} |")


if __name__ == "__main__":
    main()
