"""Benchmark: the generic dense path (``torch.func`` fallback blocks) against the structured one.

    python bench/generic.py                  # (16, 32, 1), dampings 1e-3, 1e-1, 1e-6
    python bench/generic.py --model 8,16,1 --repeats 3

The same tanh MLP as ``bench/chain.py`` (orthogonal weights, 10 classes, cross-entropy,
float64, one thread), once with tallskinny's analytic ``nn.Linear`` / ``nn.Tanh`` blocks
(structured elimination: affine stages) and once with every module wrapped in
``tallskinny.blocks.FuncBlock`` (oracles by ``torch.func``, every parameter block
factored as a dense stage split by the row space of ``G``). For each damping it prints
the median time of ``inverse_hvp`` for both (after a warm-up call), the relative
difference of the two solutions and their relative residuals ``‖(H+εI)x − b‖/‖b‖`` with
``H`` applied by autograd (independent of tallskinny). A dense solve is out of reach here
(``P = 16 170``); the residuals and the agreement of two independent eliminations are
the accuracy measure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
for path in (str(BENCH_DIR.parent), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import tallskinny as ts  # noqa: E402
from _timing import median_time  # noqa: E402
from chain import autograd_operator, build_problem, parse_model  # noqa: E402
from tallskinny.blocks import FuncBlock  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=parse_model, default=parse_model("16,32,1"), metavar="L,h,B")
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-3, 1e-1, 1e-6])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = build_problem(args.model)
    generic = ts.Chain([FuncBlock(m) for m in problem.model], loss=torch.nn.CrossEntropyLoss())
    X, y, b = problem.X, problem.y, problem.b
    print(f"# generic (torch.func fallback) vs structured path, {problem.spec.label}, P = {problem.P}")
    print(f"torch {torch.__version__}, torch.set_num_threads(1), float64, median of {args.repeats} after a warm-up, times in ms\n")
    print("|     ε | structured ms | generic ms | generic/structured | ‖x_s − x_g‖/‖x_s‖ | residual structured | residual generic |")
    print("|------:|--------------:|-----------:|-------------------:|------------------:|--------------------:|-----------------:|")
    for damping in args.dampings:
        op = autograd_operator(problem, damping)

        def residual(x: torch.Tensor) -> float:
            return float((op(x) - b).norm() / b.norm())

        t_s = median_time(lambda: problem.chain.inverse_hvp(X, y, b, damping=damping), args.repeats)
        t_g = median_time(lambda: generic.inverse_hvp(X, y, b, damping=damping), args.repeats)
        x_s = problem.chain.inverse_hvp(X, y, b, damping=damping)
        x_g = generic.inverse_hvp(X, y, b, damping=damping)
        diff = float((x_s - x_g).norm() / x_s.norm())
        print(
            f"| {damping:5.0e} | {t_s * 1e3:13.1f} | {t_g * 1e3:10.1f} | {t_g / t_s:18.1f} | {diff:17.1e} | "
            f"{residual(x_s):19.1e} | {residual(x_g):16.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
