"""Benchmark: the krylov route's products with and without the exact batch preconditioner.

``python bench/krylov.py`` — scikit-learn's digits (``N = 1000`` samples from a loader of
batch 50), a tanh MLP 64-40-10 (``P = 3010``), trained (300 Adam steps, as
``bench/evidence.py``) and at initialisation, float64, one thread. For the Gauss–Newton
matrix (CG) and the Hessian (MINRES) at each damping, ``chain.curvature(loader, kind,
method=Krylov(...))`` solves ``(M + εI)x = b`` for one fixed random ``b`` to ``rtol``, with
no preconditioner and with the exact factorization of the first ``--batch`` samples
(``preconditioner="batch"``: for the Hessian, whose MINRES needs a positive definite
preconditioner, the sub-batch's Gauss–Newton matrix + εI). Prints a Markdown table of
iterations (products with ``M``, one per iteration), residual reached and time.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parent))
from evidence import digits, loader, trained_mlp  # noqa: E402

import tallskinny as ts  # noqa: E402
from tallskinny.routes import Krylov  # noqa: E402


def run(args) -> list[dict]:
    X, y = digits(args.samples)
    rows = []
    for state, steps in (("trained", 300), ("init", 0)):
        model = trained_mlp(args.depth, args.width, X, y, steps=steps)
        chain = ts.Chain.from_sequential(model, nn.CrossEntropyLoss())
        P = sum(p.numel() for p in chain.parameters())
        b = torch.randn(P, generator=torch.Generator().manual_seed(1))
        for kind in ("ggn", "hessian"):
            for damping in args.dampings:
                row = dict(state=state, kind=kind, damping=damping, P=P)
                for name, pre in (("none", "none"), ("batch", "batch")):
                    options = Krylov(rtol=args.rtol, maxiter=args.maxiter, preconditioner=pre,
                                     preconditioner_batch=args.batch)
                    t = time.perf_counter()
                    curv = chain.curvature(loader(X, y), kind=kind, method=options)
                    fact = curv.factorize(damping)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ts.ConvergenceWarning)
                        fact.solve(b)
                    row[name] = (fact.info, time.perf_counter() - t)
                rows.append(row)
                print(f"  done {state} {kind} {damping:g}", file=sys.stderr)
    return rows


def cell(info, seconds) -> str:
    mark = "" if info.converged else " (not converged)"
    return f"{info.iterations}{mark}, {info.residual:.0e}, {seconds:.1f} s"


def report(rows, args) -> str:
    lines = [
        f"krylov route on digits, N = {args.samples} (loader of batch 50), tanh MLP {args.depth} layers of width "
        f"{args.width}, P = {rows[0]['P']}, rtol {args.rtol:g}, maxiter {args.maxiter}, float64, one thread. "
        f"Cells: iterations (products), residual reached, time (curvature pass + preconditioner + solve).",
        "",
        f"| net | kind (method) | damping | no preconditioner | exact batch-{args.batch} | products saved |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        none, batch = r["none"][0], r["batch"][0]
        method = "CG" if r["kind"] == "ggn" else "MINRES"
        lines.append(
            f"| {r['state']} | {r['kind']} ({method}) | {r['damping']:g} | {cell(*r['none'])} | {cell(*r['batch'])} | "
            f"{none.iterations / max(batch.iterations, 1):.2f}× |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="samples of the exact preconditioner")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-1])
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--maxiter", type=int, default=3000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    print(report(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
