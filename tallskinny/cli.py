"""The ``tallskinny`` command line: ``tallskinny demo`` and ``tallskinny bench``.

``tallskinny demo`` trains a deep, narrow tanh MLP on the scikit-learn digits data
(bundled with scikit-learn, no download) twice from the same initialisation — with Adam
and with the exact Gauss–Newton trust-region method (:class:`tallskinny.optim.TrustRegion`,
curvature on mini-batches of 8, gradient and ratio test on mini-batches of 256) — for the same wall-clock budget each, prints a table of train/test
loss and accuracy, saves a plot of the training loss against time, and ends with an
exactness check of one solve against a dense solve on a sub-network.

``tallskinny bench`` runs the benchmark script ``bench/chain.py`` of a source checkout.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


# -- data and model ----------------------------------------------------------------------
def load_digits_data(seed: int, dtype: torch.dtype):
    """The 8×8 digits (1797 images, 10 classes), standardised, split 75/25."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("tallskinny demo needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=dtype)
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=gen)
    n_train = int(0.75 * len(X))
    train, test = perm[:n_train], perm[n_train:]
    mean, std = X[train].mean(0), X[train].std(0).clamp_min(1e-3)
    X = (X - mean) / std
    return (X[train], y[train]), (X[test], y[test])


def deep_mlp(depth: int, width: int, d_in: int, d_out: int, seed: int, dtype: torch.dtype) -> nn.Sequential:
    """``depth`` linear layers of width ``width`` with tanh between them; orthogonal
    initialisation (gain 1) so that signals neither vanish nor explode with depth."""
    torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(sizes[i], sizes[i + 1], dtype=dtype)
        nn.init.orthogonal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(X)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


# -- training under a wall-clock budget ---------------------------------------------------
class Progress:
    """Prints one line every ``every`` seconds of training time."""

    def __init__(self, name: str, budget: float, every: float):
        self.name, self.budget, self.every, self.next = name, budget, every, 0.0

    def __call__(self, elapsed: float, steps: int, loss: float, force: bool = False) -> None:
        if elapsed >= self.next or force:
            self.next = elapsed + self.every
            print(f"  [{self.name:>5}] {elapsed:6.1f}/{self.budget:.0f} s  step {steps:6d}  train loss {loss:.4f}", flush=True)


def train(name, model, step_fn, train_data, budget: float, record_every: float, progress_every: float):
    """Run ``step_fn(step_index)`` until ``budget`` seconds of training time are used;
    the training loss on the whole training set is recorded every ``record_every``
    seconds (evaluation time is not counted)."""
    X, y = train_data
    history = [(0.0, evaluate(model, X, y)[0])]
    progress = Progress(name, budget, progress_every)
    progress(0.0, 0, history[0][1])
    elapsed, steps, next_record = 0.0, 0, record_every
    while elapsed < budget:
        start = time.perf_counter()
        step_fn(steps)
        elapsed += time.perf_counter() - start
        steps += 1
        if elapsed >= next_record or elapsed >= budget:
            next_record = elapsed + record_every
            loss = evaluate(model, X, y)[0]
            if not math.isfinite(loss):
                raise FloatingPointError(f"{name}: the training loss became {loss}")
            history.append((elapsed, loss))
            progress(elapsed, steps, loss)
    progress(elapsed, steps, history[-1][1], force=True)
    return history, steps


def run_demo(args) -> dict:
    import tallskinny as ts
    from tallskinny.optim import TrustRegion

    dtype = torch.float64
    torch.set_num_threads(max(1, args.threads))
    (X_train, y_train), (X_test, y_test) = load_digits_data(args.seed, dtype)
    base = deep_mlp(args.depth, args.width, X_train.shape[1], 10, args.seed, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"digits: {len(X_train)} train / {len(X_test)} test images; MLP of {args.depth} layers of width "
        f"{args.width} (tanh), {n_params} parameters; budget {args.budget:g} s per optimizer",
        flush=True,
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    results = {}

    # Adam
    adam_model = copy.deepcopy(base)
    adam = torch.optim.Adam(adam_model.parameters(), lr=args.adam_lr)

    def adam_step(_):
        idx = torch.randint(0, len(X_train), (args.adam_batch,), generator=gen)
        adam.zero_grad()
        nn.functional.cross_entropy(adam_model(X_train[idx]), y_train[idx]).backward()
        adam.step()

    print(f"Adam (lr {args.adam_lr:g}, batch {args.adam_batch}):", flush=True)
    hist, steps = train("adam", adam_model, adam_step, (X_train, y_train), args.budget, args.record_every, args.progress_every)
    results["adam"] = dict(history=hist, steps=steps)

    # exact Gauss–Newton trust region
    tr_model = copy.deepcopy(base)
    chain = ts.Chain.from_sequential(tr_model, nn.CrossEntropyLoss())
    tr = TrustRegion(chain, kind="ggn", radius=args.radius, max_radius=10.0)

    def tr_step(_):
        idx = torch.randint(0, len(X_train), (args.exact_batch,), generator=gen)
        gidx = torch.randint(0, len(X_train), (args.gradient_batch,), generator=gen)
        tr.step((X_train[idx], y_train[idx]), (X_train[gidx], y_train[gidx]))

    print(
        f"exact GGN trust region (curvature batch {args.exact_batch}, gradient batch {args.gradient_batch}):",
        flush=True,
    )
    hist, steps = train("exact", tr_model, tr_step, (X_train, y_train), args.budget, args.record_every, args.progress_every)
    results["exact"] = dict(history=hist, steps=steps)

    # table
    print()
    print(f"{'optimizer':<24}{'steps':>7}{'train loss':>12}{'train acc':>11}{'test loss':>11}{'test acc':>10}")
    for key, model, label in [("adam", adam_model, "Adam"), ("exact", tr_model, "exact GGN trust region")]:
        train_loss, train_acc = evaluate(model, X_train, y_train)
        test_loss, test_acc = evaluate(model, X_test, y_test)
        results[key].update(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)
        print(f"{label:<24}{results[key]['steps']:>7d}{train_loss:>12.4f}{train_acc:>11.3f}{test_loss:>11.4f}{test_acc:>10.3f}")
    better = "exact" if results["exact"]["train_loss"] < results["adam"]["train_loss"] else "adam"
    ratio = results["adam"]["train_loss"] / results["exact"]["train_loss"]
    print(f"lower training loss within {args.budget:g} s: {'exact GGN trust region' if better == 'exact' else 'Adam'} "
          f"(Adam/exact train loss ratio {ratio:.3g})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "demo_loss.png"
    _plot(results, plot, args)
    print(f"plot: {plot}")

    results["exactness"] = exactness_check(ts, tr_model, X_train[: args.check_batch], y_train[: args.check_batch])
    check = results["exactness"]
    print(
        f"exactness check: sub-network of the last {check['layers']} layers, P = {check['parameters']}, "
        f"batch {check['batch']}, damping {check['damping']:g}: relative difference of the tallskinny solve "
        f"to a dense solve = {check['relative_error']:.1e}"
    )
    (out / "demo_results.json").write_text(json.dumps(results, indent=1))
    return results


def exactness_check(ts, model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, damping: float = 1e-3) -> dict:
    """``(H + εI)⁻¹ b`` on the last three linear layers of the trained network (inputs: the
    activations entering them), against ``torch.linalg.solve`` with the Hessian from
    ``torch.func.hessian`` of the plain PyTorch loss."""
    layers = list(model)
    head = layers[-5:]  # Linear, Tanh, Linear, Tanh, Linear
    with torch.no_grad():
        z = X
        for m in layers[:-5]:
            z = m(z)
    sub = nn.Sequential(*head)
    chain = ts.Chain.from_sequential(sub, nn.CrossEntropyLoss())
    params = dict(sub.named_parameters())
    names = list(params)
    shapes = [p.shape for p in params.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_of(t):
        pieces = torch.split(t, [s.numel() for s in shapes])
        values = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(sub, values, (z,)), y)

    H = torch.func.hessian(loss_of)(theta)
    b = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    x = chain.inverse_hvp(z, y, b, damping=damping)
    x_dense = torch.linalg.solve(H + damping * torch.eye(len(b), dtype=b.dtype), b)
    error = float((x - x_dense).norm() / x_dense.norm())
    return dict(layers=3, parameters=theta.numel(), batch=len(X), damping=damping, relative_error=error)


def _plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("adam", f"Adam (batch {args.adam_batch})"), ("exact", f"exact GGN trust region (curvature batch {args.exact_batch})")]:
        t, loss = zip(*results[key]["history"])
        ax.plot(t, loss, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"digits, {args.depth}-layer tanh MLP of width {args.width}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- bench --------------------------------------------------------------------------------
def run_bench(argv: Sequence[str], candidates: Sequence[Path] | None = None) -> int:
    """Run ``bench/chain.py``'s ``main(argv)`` from the source checkout this package lives in
    (or from the current directory)."""
    if candidates is None:
        candidates = [Path(__file__).resolve().parents[1] / "bench" / "chain.py", Path.cwd() / "bench" / "chain.py"]
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("tallskinny_bench_chain", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            if not hasattr(module, "main"):
                print(f"error: {path} has no main(argv) function", file=sys.stderr)
                return 2
            result = module.main(list(argv))
            return int(result) if isinstance(result, int) else 0
    print(
        "error: the benchmark script bench/chain.py was not found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "); it ships with the source repository, not with the installed package: "
        "run `tallskinny bench` from a checkout of the repository",
        file=sys.stderr,
    )
    return 2


# -- entry point --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tallskinny", description="Exact second-order calculus for deep chains.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Adam vs the exact Gauss–Newton trust-region method on digits")
    demo.add_argument("--budget", type=float, default=55.0, help="training seconds per optimizer (default 55)")
    demo.add_argument("--out", default="tallskinny-demo", help="folder for the plot and results (default ./tallskinny-demo)")
    demo.add_argument("--depth", type=int, default=16, help="number of linear layers (default 16)")
    demo.add_argument("--width", type=int, default=32, help="hidden width (default 32)")
    demo.add_argument("--exact-batch", type=int, default=8, help="mini-batch of the exact optimizer (default 8)")
    demo.add_argument(
        "--gradient-batch", type=int, default=256,
        help="mini-batch of the exact optimizer's gradient and ratio test (default 256)",
    )
    demo.add_argument("--adam-batch", type=int, default=64, help="mini-batch of Adam (default 64)")
    demo.add_argument("--adam-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    demo.add_argument("--radius", type=float, default=1.0, help="initial trust-region radius (default 1)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the matrices are small)")
    demo.add_argument("--check-batch", type=int, default=4, help="batch of the final exactness check (default 4)")
    demo.add_argument("--record-every", type=float, default=1.0, help=argparse.SUPPRESS)
    demo.add_argument("--progress-every", type=float, default=10.0, help=argparse.SUPPRESS)
    bench = sub.add_parser("bench", help="run bench/chain.py from the source checkout")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to bench/chain.py")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tallskinny demo [--budget S] [--out DIR] …`` or ``tallskinny bench [ARGS…]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" (--help included) goes to bench/chain.py
        return run_bench(argv[1:])
    args = _parser().parse_args(argv)
    for name in ("budget", "radius", "adam_lr"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0")
    for name in ("depth", "width", "exact_batch", "gradient_batch", "adam_batch", "check_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.depth < 3:
        raise SystemExit("error: --depth must be >= 3 (the exactness check uses the last three layers)")
    previous = torch.get_default_dtype()
    try:
        run_demo(args)
    finally:
        torch.set_default_dtype(previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
