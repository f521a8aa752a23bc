"""The flop floor of the benchmarks: the elimination's flops at this machine's GEMM rate.

``gemm_rate(n)`` times ``torch.mm`` of two ``n × n`` matrices (median of a few timings,
each of enough products to last about a millisecond) in the current thread setting, so
it is measured in the same run as the times it is compared with. ``floor(curvature)``
is ``flops / rate`` at the size of the model's largest stage
(:meth:`tallskinny.Curvature.elimination_flops`): the time one factorization and one
solve would take if every operation ran as fast as a GEMM of that size.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def gemm_rate(n: int, dtype: torch.dtype = torch.float64, repeats: int = 5, device: str = "cpu",
              sync: Callable[[], None] = lambda: None) -> float:
    """Flop/s of ``torch.mm`` on ``n × n`` matrices (``2n³`` flops a product)."""
    n = max(int(n), 1)
    gen = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    B = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    C = torch.empty(n, n, dtype=dtype, device=device)
    inner = max(1, int(2e6 // (2 * n**3)))  # about 2 Mflop per timing at least
    for _ in range(inner):
        torch.mm(A, B, out=C)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(A, B, out=C)
        sync()
        times.append((time.perf_counter() - start) / inner)
    return 2 * n**3 / statistics.median(times)


def flop_floor(curvature, repeats: int = 5, device: str = "cpu", sync: Callable[[], None] = lambda: None) -> dict:
    """The elimination's flops (one factorization and one solve) and their floor in
    seconds at the float64 GEMM rate of the largest stage size (and the float32 rate there)."""
    flops = curvature.elimination_flops()
    size = flops.size
    rate = gemm_rate(size, torch.float64, repeats, device, sync)
    return {
        "flops": flops.total,
        "lower_flops": flops.lower,
        "factorize_flops": flops.factorize,
        "solve_flops": flops.solve,
        "size": size,
        "gemm_rate": rate,
        "gemm_rate_float32": gemm_rate(size, torch.float32, repeats, device, sync),
        "floor_seconds": flops.total / rate,
        "lower_floor_seconds": flops.lower / rate,
    }
