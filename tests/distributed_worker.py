"""One rank of ``tests/test_distributed.py`` (run as a script), and the computations that
test compares: the same functions give the single-process reference there.

``python distributed_worker.py OUT`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment (as torchrun sets them): joins the gloo group, computes
everything of :func:`compute` on its shard and the error cases of :func:`errors`, and
saves the results to ``OUT`` (``{rank}`` in it replaced by the rank).
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
from torch import nn

import tallskinny as ts
from tallskinny.influence import influence
from tallskinny.laplace import Laplace

# unequal shards: rank 0 holds samples 0..3 (batches of 3: 3 + 1), rank 1 samples 4..6 (2 + 1)
SHARDS = ((0, 4, 3), (4, 7, 2))
TEST = ((0, 2), (2, 5))  # test points per rank (influence)
ROUTES = {"hessian": ("riccati", "dense", "auto"), "ggn": ("riccati", "kernel", "dense", "auto")}
DAMPING = 0.3


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    Xt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (5,), generator=g)
    return X, y, Xt, yt


def model(seed: int = 1) -> ts.Chain:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return ts.Chain.from_sequential(net, nn.CrossEntropyLoss())


def batches(X, y, size):
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def compute(train, test, *, distributed=None) -> dict:
    """Every quantity compared: per kind and route, the loss, gradient, an HVP, a solve,
    log|det| and inertia; Laplace's evidence; influence scores. ``train``/``test``: loaders."""
    chain = model()
    P = sum(p.numel() for p in chain.parameters())
    v = torch.linspace(-1, 1, P, dtype=torch.float64).reshape(P, 1).repeat(1, 2)
    v[:, 1] = v[:, 1].flip(0) ** 2
    out = {}
    for kind, methods in ROUTES.items():
        for method in methods:
            curv = chain.curvature(train, kind=kind, method=method, distributed=distributed)
            fact = curv.factorize(DAMPING)
            out[kind, method] = {
                "method": curv.method,
                "loss": curv.loss,
                "gradient": curv.gradient(),
                "hvp": curv.hvp(v),
                "solve": curv.solve(v, DAMPING),
                "logdet": fact.logdet(),
                "inertia": tuple(fact.inertia()),
            }
    la = Laplace(chain, train, distributed=distributed)
    out["laplace"] = {
        "nll": la.nll,
        "evidence": [la.log_marginal_likelihood(a) for a in (0.1, 1.0, 10.0)],
        "prior": la.optimize_prior_precision(1e-3, 1e3, tol=1e-3),
        "probit": la.predictive_probabilities(data()[2], 1.0),
    }
    out["influence"] = {
        kind: influence(chain, train, test, damping=DAMPING, kind=kind, distributed=distributed)
        for kind in ("ggn", "hessian")
    }
    return out


def shard(rank: int):
    X, y, Xt, yt = data()
    lo, hi, size = SHARDS[rank]
    a, b = TEST[rank]
    return batches(X[lo:hi], y[lo:hi], size), [(Xt[a:b], yt[a:b])]


def errors(rank: int) -> dict:
    """The exception each collective failure raises on this rank (class name)."""
    X, y, _, _ = data()
    out = {}

    def caught(f):
        try:
            f()
        except Exception as err:  # noqa: BLE001
            return type(err).__name__
        return None

    chain = model()
    # rank 1's inputs are 4 wide: the shapes disagree
    wide = [(torch.randn(2, 4 if rank else 3, dtype=torch.float64), y[:2])]
    out["shapes"] = caught(lambda: chain.curvature(wide, kind="ggn"))
    # rank 1's targets are float: the dtypes disagree
    typed = [(X[:2], y[:2].double() if rank else y[:2])]
    out["dtypes"] = caught(lambda: chain.curvature(typed, kind="ggn"))
    # rank 1's model differs
    out["parameters"] = caught(lambda: model(seed=1 + rank).curvature([(X[:2], y[:2])], kind="ggn"))
    # rank 1's loader yields something that is not a pair: it raises its own error
    broken = [(X[:2], y[:2])] if rank == 0 else [X[:2]]
    out["broken"] = caught(lambda: chain.curvature(broken, kind="ggn"))
    # rank 1 has no samples at all: fine, the curvature is rank 0's samples
    empty = [(X[:5], y[:5])] if rank == 0 else []
    out["empty"] = chain.curvature(empty, kind="ggn", method="kernel").factorize(DAMPING).logdet()
    return out


def main(path: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        rank = torch.distributed.get_rank()
        train, test = shard(rank)
        results = compute(train, test)
        results["errors"] = errors(rank)
        torch.save(results, path.format(rank=rank))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
