"""Benchmark: the Laplace evidence of a digits classifier, tallskinny against laplace-torch.

``python bench/evidence.py`` — scikit-learn's digits (64 pixels, 10 classes), an MLP of
``depth`` ``nn.Linear`` layers of width ``width`` (tanh), trained briefly with Adam, float64,
one thread. For each configuration, in one run: tallskinny's ``Laplace(chain, loader)``
(Gauss–Newton, the route ``method="auto"`` picks) and ``log_marginal_likelihood`` at 20 prior
precisions, against laplace-torch's ``Laplace(..., subset_of_weights="all",
hessian_structure="full")`` ``fit`` and the same 20 ``log_marginal_likelihood`` calls
(the bench-only extra ``pip install laplace-torch``; uninstall the torchvision it pulls in
where it breaks the import). Also: exact influence scores (GGN) of ``--influence`` training
points on 10 test points. Prints a Markdown table; medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch import nn

import tallskinny as ts
from tallskinny.influence import influence
from tallskinny.laplace import Laplace

CONFIGS = [(4, 16, 200), (4, 16, 1000), (4, 64, 200)]  # (depth, width, samples)


def digits(n: int, seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(X), generator=g)[:n]
    X = torch.tensor(X, dtype=torch.float64)[idx] / 16.0
    return X, torch.tensor(y)[idx]


def trained_mlp(depth: int, width: int, X, y, steps: int = 300, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [64] + [width] * (depth - 1) + [10]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


def loader(X, y, batch: int = 50):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)


def alphas(n: int = 20):
    return [10 ** (-3 + 6 * i / (n - 1)) for i in range(n)]


def ours(model, X, y):
    chain = ts.Chain.from_sequential(model, nn.CrossEntropyLoss())
    lap = Laplace(chain, loader(X, y))
    return [lap.log_marginal_likelihood(a) for a in alphas()], lap.curvature.method


def theirs(model, X, y):
    from laplace import Laplace as PeerLaplace

    la = PeerLaplace(model, "classification", subset_of_weights="all", hessian_structure="full")
    la.fit(loader(X, y))
    out = []
    for a in alphas():
        la.prior_precision = a
        out.append(float(la.log_marginal_likelihood()))
    return out


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--influence", type=int, default=1000, help="training points of the influence run (0: skip)")
    parser.add_argument("--no-peer", action="store_true", help="skip laplace-torch")
    parser.add_argument("--configs", nargs="+", default=None, help="depth,width,samples triples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    lines = [
        "Laplace evidence at 20 prior precisions (fit + 20 evaluations), digits, float64, one thread",
        "",
        "| depth, width, N | P | tallskinny (route) | laplace-torch full | ratio | max |Δ evidence| (relative) |",
        "|---|---|---|---|---|---|",
    ]
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    for depth, width, n in configs:
        X, y = digits(n)
        model = trained_mlp(depth, width, X, y)
        P = sum(p.numel() for p in model.parameters())
        t_ours, (ev_ours, route) = timed(lambda: ours(model, X, y), args.repeats)
        if args.no_peer:
            lines.append(f"| {depth}, {width}, {n} | {P} | {t_ours:.2f} s ({route}) | — | — | — |")
            continue
        t_peer, ev_peer = timed(lambda: theirs(model, X, y), 1 if P > 5000 else args.repeats)
        diff = max(abs(a - b) / abs(b) for a, b in zip(ev_ours, ev_peer))
        lines.append(
            f"| {depth}, {width}, {n} | {P} | {t_ours:.2f} s ({route}) | {t_peer:.2f} s | "
            f"{t_ours / t_peer:.2f} | {diff:.1e} |"
        )
        print(f"  done {depth},{width},{n}", file=sys.stderr)
    print("\n".join(lines))
    if args.influence:
        X, y = digits(args.influence + 10, seed=1)
        model = trained_mlp(4, 16, X[:-10], y[:-10])
        chain = ts.Chain.from_sequential(model, nn.CrossEntropyLoss())
        t, scores = timed(
            lambda: influence(chain, loader(X[:-10], y[:-10]), (X[-10:], y[-10:]), damping=1e-3, kind="ggn"), 1
        )
        curv = chain.curvature(X[:-10], y[:-10], kind="ggn")
        print(
            f"\nExact influence scores (GGN, damping 1e-3) of {args.influence} digits training points on 10 "
            f"test points, MLP 4×16 (P = {sum(p.numel() for p in model.parameters())}): {t:.1f} s "
            f"(route {curv.method}), scores finite: {bool(torch.isfinite(scores).all())}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
