"""Benchmark: the exact routes for the Gauss–Newton solve, and what ``method="auto"`` picks.

``python bench/routes.py`` — tanh MLPs ``(L, h, B)`` (``L`` ``nn.Linear`` layers of width
``h``, orthogonal weights, 10 classes, cross-entropy, batch ``B``), float64, one thread:
``chain.inverse_hvp(X, y, b, damping, kind="ggn", method=m)`` for every route and for
``auto``, against a plain ``torch.func`` baseline a user could write (``vmap(jacrev)``
Jacobian, Woodbury on the ``B·c × B·c`` kernel). Medians of ``--repeats`` runs after a
warm-up; the routes of one model are timed in interleaved rounds and the ratios are
medians of per-round ratios (the machine is shared). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import tallskinny as ts

DEFAULT_MODELS = [(16, 32, 1), (16, 32, 4), (16, 32, 8), (16, 32, 32), (16, 32, 64)]
ROUTES = ("riccati", "kernel", "dense")


def mlp(L: int, h: int, classes: int = 10, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(L):
        lin = nn.Linear(h, classes if i == L - 1 else h)
        nn.init.orthogonal_(lin.weight)
        nn.init.normal_(lin.bias, std=0.1)
        layers.append(lin)
        if i < L - 1:
            layers.append(nn.Tanh())
    return layers


def woodbury_baseline(modules, X, y, b, damping):
    """``(G + εI)⁻¹ b`` with ``torch.func``: per-sample Jacobians, the loss Hessian's square
    root, Woodbury on the ``N·c`` kernel (what a user writes without tallskinny)."""
    model = nn.Sequential(*modules)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    Jd = vmap(jacrev(f), in_dims=(None, 0))(params, X)  # dict of (N, c, *shape)
    N, c = X.shape[0], Jd[names[0]].shape[1]
    J = torch.cat([Jd[n].reshape(N, c, -1) for n in names], dim=2)  # N × c × P
    logits = model(X).detach()
    p = torch.softmax(logits, dim=1)
    Lam = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / N  # mean cross-entropy
    lam, Q = torch.linalg.eigh(Lam)
    root = Q * lam.clamp_min(0).sqrt().unsqueeze(1)  # Λ = root rootᵀ
    A = (root.mT @ J).reshape(N * c, -1)  # N·c × P
    K = A @ A.mT
    K.diagonal().add_(damping)
    return (b - A.mT @ torch.linalg.solve(K, A @ b)) / damping


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(models, damping: float, repeats: int, dense_limit: int, riccati_limit: float) -> list[dict]:
    rows = []
    for L, h, B in models:
        modules = mlp(L, h)
        chain = ts.Chain(modules, nn.CrossEntropyLoss())
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(B, h, generator=g), torch.randint(0, 10, (B,), generator=g)
        P = sum(p.numel() for p in chain.parameters())
        b = torch.randn(P, generator=g)
        curv = chain.curvature(X, y, kind="ggn")
        auto = curv.method
        est = {c.name: c.seconds for c in curv._route_costs}
        candidates = {"baseline": lambda: woodbury_baseline(modules, X, y, b, damping)}
        for m in ROUTES:
            if m == "dense" and P > dense_limit:
                continue
            if m == "riccati" and est["riccati"] > riccati_limit:
                continue
            candidates[m] = (lambda m=m: chain.inverse_hvp(X, y, b, damping, kind="ggn", method=m))
        candidates["auto"] = lambda: chain.inverse_hvp(X, y, b, damping, kind="ggn")
        # accuracy: every route against the baseline's answer
        ref = woodbury_baseline(modules, X, y, b, damping)
        errors = {m: float((fn() - ref).norm() / ref.norm()) for m, fn in candidates.items()}
        times = {m: [] for m in candidates}
        for _ in range(repeats):  # interleaved rounds
            for m, fn in candidates.items():
                times[m].extend(timed(fn, 1))
        med = {m: statistics.median(t) for m, t in times.items()}
        ratio = {m: statistics.median([a / c for a, c in zip(times[m], times["baseline"])]) for m in times}
        fastest = min((m for m in med if m in ROUTES), key=med.get)
        rows.append(dict(model=(L, h, B), P=P, auto=auto, med=med, ratio=ratio, errors=errors, fastest=fastest,
                         estimates=est))
        print(f"  done {L},{h},{B}: auto={auto}, fastest={fastest}", file=sys.stderr)
    return rows


def report(rows, damping: float) -> str:
    lines = [
        f"GGN `inverse_hvp`, damping {damping:g}, float64, one thread; times in ms (median), "
        "ratios to the torch.func + Woodbury baseline (median of per-round ratios)",
        "",
        "| L,h,B | P | baseline | riccati | kernel | dense | auto (route) | auto / baseline | auto / fastest | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med, ratio = r["med"], r["ratio"]

        def cell(m):
            return f"{med[m] * 1e3:.1f}" if m in med else "—"

        auto_fastest = med["auto"] / med[r["fastest"]]
        lines.append(
            f"| {','.join(map(str, r['model']))} | {r['P']} | {cell('baseline')} | {cell('riccati')} | "
            f"{cell('kernel')} | {cell('dense')} | {cell('auto')} ({r['auto']}) | {ratio['auto']:.2f} | "
            f"{auto_fastest:.2f} | {max(r['errors'].values()):.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="L,h,B triples")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-limit", type=int, default=6000, help="largest P for the dense route")
    parser.add_argument("--riccati-limit", type=float, default=30.0, help="skip riccati above this estimate (s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    models = [tuple(int(v) for v in m.split(",")) for m in args.models] if args.models else DEFAULT_MODELS
    rows = run(models, args.damping, args.repeats, args.dense_limit, args.riccati_limit)
    print(report(rows, args.damping))
    return 0


if __name__ == "__main__":
    sys.exit(main())
