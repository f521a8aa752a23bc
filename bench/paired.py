"""``inverse_hvp`` of ``bench/chain.py``'s models for two checkouts, interleaved in one run.

    .venv/bin/python bench/paired.py --base c1e3e46            # this checkout against c1e3e46
    .venv/bin/python bench/paired.py --base main --models 16,32,1 --rounds 21

The base revision is exported with ``git archive`` to a temporary folder. Each checkout gets
one worker process (one thread, ``PYTHONPATH`` = that checkout, its own ``bench/chain.py``
building the problems), and the two are timed in alternating order round after round, so
both see the same load: a shared machine's drift cancels in the per-round ratios. Each
round times ``--calls`` calls per checkout and keeps the fastest (the one least disturbed
by other processes); the table gives the medians over rounds and the median of the
per-round ratios new/base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ((16, 32, 1), (64, 32, 1), (256, 32, 1), (64, 64, 1), (16, 32, 8), (16, 32, 32), (64, 16, 4))

# Runs in the worker, with the checkout as the working directory and sys.path[0].
WORKER = r"""
import json, statistics, sys, time
sys.path.insert(1, "bench")
import torch
torch.set_num_threads(1)
import chain as bench
import tallskinny
problems = {}
print(json.dumps({"tallskinny": tallskinny.__file__}), flush=True)
for line in sys.stdin:
    L, h, B, damping, calls = json.loads(line)
    key = (L, h, B)
    if key not in problems:
        problems[key] = p = bench.build_problem(bench.ModelSpec(L, h, B))
        p.chain.inverse_hvp(p.X, p.y, p.b, damping=damping)  # warm-up
    p = problems[key]
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        p.chain.inverse_hvp(p.X, p.y, p.b, damping=damping)
        times.append(time.perf_counter() - start)
    print(json.dumps(min(times)), flush=True)
"""


class Worker:
    def __init__(self, checkout: Path):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=checkout, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.module = json.loads(self.proc.stdout.readline())["tallskinny"]
        if not Path(self.module).resolve().is_relative_to(checkout.resolve()):
            raise RuntimeError(f"the worker for {checkout} imported {self.module}")

    def time(self, model: tuple[int, int, int], damping: float, calls: int) -> float:
        self.proc.stdin.write(json.dumps([*model, damping, calls]) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def export(rev: str, into: Path) -> str:
    """``rev``'s tree in ``into`` (``git archive``); returns its short hash."""
    short = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()
    archive = subprocess.Popen(["git", "archive", rev], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise RuntimeError(f"git archive {rev} failed")
    return short


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (e.g. main, c1e3e46)")
    parser.add_argument("--models", nargs="+", default=[",".join(map(str, m)) for m in MODELS], help="L,h,B …")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="calls per checkout and round (the fastest counts)")
    args = parser.parse_args(argv)
    models = [tuple(int(x) for x in m.split(",")) for m in args.models]
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--", "tallskinny"], cwd=ROOT, text=True).strip())
    with tempfile.TemporaryDirectory(prefix="paired-base-") as tmp:
        base_rev = export(args.base, Path(tmp))
        new, base = Worker(ROOT), Worker(Path(tmp))
        times: dict = {m: ([], []) for m in models}
        try:
            for r in range(args.rounds):
                for m in models:
                    order = [(0, new), (1, base)] if r % 2 == 0 else [(1, base), (0, new)]
                    for i, w in order:
                        times[m][i].append(w.time(m, args.damping, args.calls))
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        finally:
            new.close()
            base.close()
    print(f"inverse_hvp, ε = {args.damping:g}: {head}{' (+ uncommitted changes)' if dirty else ''} (new) against "
          f"{base_rev} (base); {args.rounds} interleaved rounds, fastest of {args.calls} calls each, one thread\n")
    print("| model (L, h, B) | new ms | base ms | ratio new/base |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for m in models:
        t_new, t_base = times[m]
        ratio = statistics.median(a / b for a, b in zip(t_new, t_base))
        worst = max(worst, abs(ratio - 1.0))
        print(f"| {m} | {1e3 * statistics.median(t_new):.2f} | {1e3 * statistics.median(t_base):.2f} | {ratio:.3f} |")
    print(f"\nlargest |ratio − 1|: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
