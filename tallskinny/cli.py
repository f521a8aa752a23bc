"""The ``tallskinny`` command line: ``tallskinny demo`` and ``tallskinny bench``.

``tallskinny demo`` trains a deep, narrow tanh MLP on the scikit-learn digits data
(bundled with scikit-learn, no download) twice from the same initialisation — with Adam
and with the exact Gauss–Newton trust-region method (:class:`tallskinny.optim.TrustRegion`,
curvature on mini-batches of 8, gradient and ratio test on mini-batches of 256) — for the same wall-clock budget each, prints a table of train/test
loss and accuracy, saves a plot of the training loss against time, and ends with an
exactness check of one solve against a dense solve on a sub-network.

``tallskinny spectrum`` trains the same model with the exact method and follows the exact
Hessian spectrum of a fixed batch along training: the number of negative eigenvalues and
the top and bottom eigenvalues at checkpoints, then a 50-bin exact histogram of the trained
model next to the stochastic Lanczos quadrature estimate (JSON and PNGs). ``tallskinny demo``
ends with that histogram of its trained model (``--no-spectrum`` skips it).

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


def adam_stepper(model: nn.Module, train_data, args, gen: torch.Generator):
    """One Adam step on a random mini-batch of ``args.adam_batch`` per call."""
    X, y = train_data
    adam = torch.optim.Adam(model.parameters(), lr=args.adam_lr)

    def step(_):
        idx = torch.randint(0, len(X), (args.adam_batch,), generator=gen)
        adam.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        adam.step()

    return step


def exact_stepper(model: nn.Sequential, train_data, args, gen: torch.Generator):
    """One step of the exact Gauss–Newton trust region per call (curvature on
    ``args.exact_batch`` images, gradient and ratio test on ``args.gradient_batch``)."""
    import tallskinny as ts
    from tallskinny.optim import TrustRegion

    X, y = train_data
    chain = ts.Chain.from_sequential(model, nn.CrossEntropyLoss())
    tr = TrustRegion(chain, kind="ggn", radius=args.radius, max_radius=10.0)

    def step(_):
        idx = torch.randint(0, len(X), (args.exact_batch,), generator=gen)
        gidx = torch.randint(0, len(X), (args.gradient_batch,), generator=gen)
        tr.step((X[idx], y[idx]), (X[gidx], y[gidx]))

    return step


def run_demo(args) -> dict:
    import tallskinny as ts

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
    adam_step = adam_stepper(adam_model, (X_train, y_train), args, gen)
    print(f"Adam (lr {args.adam_lr:g}, batch {args.adam_batch}):", flush=True)
    hist, steps = train("adam", adam_model, adam_step, (X_train, y_train), args.budget, args.record_every, args.progress_every)
    results["adam"] = dict(history=hist, steps=steps)

    # exact Gauss–Newton trust region
    tr_model = copy.deepcopy(base)
    tr_step = exact_stepper(tr_model, (X_train, y_train), args, gen)
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
    if args.spectrum:
        print(f"exact Hessian spectrum of the trained model (batch of {args.spectrum_batch} training images):", flush=True)
        picture = spectrum_picture(tr_model, X_train[: args.spectrum_batch], y_train[: args.spectrum_batch], args)
        results["spectrum"] = picture
        print(spectrum_summary(picture))
        if _write_histogram(picture, out / "demo_spectrum.png", f"digits MLP after {args.budget:g} s of the exact method"):
            print(f"spectrum picture: {out / 'demo_spectrum.png'}")
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


# -- spectrum -----------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar on stderr (no dependency): ``update(done, note)``."""

    def __init__(self, label: str, total: int, stream=None, width: int = 24):
        self.label, self.total, self.width = label, max(1, total), width
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        filled = round(self.width * min(done, self.total) / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f} s {note:<40}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def checkpoint_spectrum(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, zero: float) -> dict:
    """The exact Hessian's bottom and top eigenvalues on ``(X, y)`` (``eigvalsh``) and
    the number of its eigenvalues below ``−zero·ρ``, ``ρ = max(|λ_min|, |λ_max|)`` (one
    factorization: the count stays clear of the bulk of (near-)zeros)."""
    import tallskinny as ts

    curv = ts.Chain.from_sequential(model, nn.CrossEntropyLoss()).curvature(X, y)
    top = float(curv.eigvalsh(1, "largest")[0])
    bottom = float(curv.eigvalsh(1, "smallest")[0])
    rho = max(abs(top), abs(bottom))
    return dict(top=top, bottom=bottom, negative=curv.negative_count(zero * rho), zero=zero * rho,
                parameters=curv.num_parameters)


def slq_width(lower: float, upper: float) -> float:
    """PyHessian's Gaussian broadening: variance ``1e-5·max(1, range)``."""
    return math.sqrt(1e-5 * max(1.0, upper - lower))


def spectrum_picture(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, args, progress: bool = True) -> dict:
    """The exact ``args.bins``-bin histogram of the Hessian on ``(X, y)`` (symmetric-log
    bins, the zero bin ``[−δ, δ)``, ``δ = args.zero·ρ``) and SLQ's estimate per bin."""
    import tallskinny as ts
    from tallskinny import spectrum

    start = time.perf_counter()
    curv = ts.Chain.from_sequential(model, nn.CrossEntropyLoss()).curvature(X, y)
    top = float(curv.eigvalsh(1, "largest")[0])
    bottom = float(curv.eigvalsh(1, "smallest")[0])
    rho = max(abs(top), abs(bottom))
    delta = args.zero * rho
    lower, upper = min(bottom, -delta) - 1e-3 * rho, max(top, delta) + 1e-3 * rho
    edges = spectrum.symlog_edges(lower, upper, args.bins, delta)
    bar = ProgressBar("histogram", edges.numel()) if progress else None
    hist = curv.spectral_histogram(edges, zero=delta, progress=(lambda d, t: bar.update(d, "shifted factorizations")) if bar else None)
    if bar:
        bar.close()
    exact_s = time.perf_counter() - start
    t0 = time.perf_counter()
    est = spectrum.slq(curv.hvp, curv.num_parameters, probes=args.slq_probes, steps=args.slq_steps, seed=args.seed)
    slq_s = time.perf_counter() - t0
    width = slq_width(lower, upper)
    return dict(
        parameters=curv.num_parameters, batch=len(X), top=top, bottom=bottom, zero=delta,
        edges=hist.edges.tolist(), counts=hist.counts.tolist(), zeros=hist.zeros, below=hist.below, above=hist.above,
        negative=int(sum(c for c, e in zip(hist.counts.tolist(), hist.edges.tolist()) if e < -delta)),
        slq=dict(probes=args.slq_probes, steps=args.slq_steps, width=width, nodes=est.nodes.tolist(),
                 weights=est.weights.tolist(), counts=est.counts(hist.edges, width).tolist(),
                 negative=float(est.weights[est.nodes < -delta].sum())),
        seconds=dict(exact=exact_s, slq=slq_s),
    )


def spectrum_summary(picture: dict) -> str:
    slq = picture["slq"]
    return (
        f"  P = {picture['parameters']}: {picture['negative']} eigenvalues below -{picture['zero']:.2e}, "
        f"{picture['zeros']} in the zero bin |λ| < {picture['zero']:.2e}, "
        f"{picture['parameters'] - picture['negative'] - picture['zeros']} above; "
        f"λ in [{picture['bottom']:.6g}, {picture['top']:.6g}]\n"
        f"  SLQ ({slq['probes']} probe, {slq['steps']} Lanczos steps) estimates {slq['negative']:.0f} below "
        f"-{picture['zero']:.2e}; exact histogram {picture['seconds']['exact']:.1f} s, SLQ {picture['seconds']['slq']:.2f} s"
    )


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or ``None`` where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_histogram(picture: dict, path: Path, title: str) -> bool:
    """The exact histogram next to SLQ's estimate, as a PNG (``False`` without matplotlib)."""
    from tallskinny import spectrum

    plt = _pyplot()
    if plt is None:
        return False
    hist = spectrum.Histogram(
        torch.tensor(picture["edges"], dtype=torch.float64), torch.tensor(picture["counts"]), picture["zeros"],
        picture["below"], picture["above"], picture["zero"],
    )
    slq = picture["slq"]
    est = spectrum.SLQ(torch.tensor(slq["nodes"], dtype=torch.float64), torch.tensor(slq["weights"], dtype=torch.float64))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    spectrum.plot_histogram(hist, ax, slq=est, width=slq["width"], label="exact counts (inertia)")
    ax.set_title(
        f"{title}: Hessian on {picture['batch']} images, P = {picture['parameters']}\n"
        f"exact: {picture['negative']} negative (below -{picture['zero']:.1e}); "
        f"SLQ ({slq['steps']} steps) estimates {slq['negative']:.0f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _write_training_plot(checkpoints: list[dict], path: Path, title: str, zero: float) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    t = [c["step"] for c in checkpoints]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(t, [c["negative"] for c in checkpoints], "o-")
    a1.set_xlabel("optimizer step")
    a1.set_ylabel(f"eigenvalues below -{zero:g}·max|λ| (exact)")
    a2.plot(t, [c["top"] for c in checkpoints], "o-", label="largest")
    a2.plot(t, [c["bottom"] for c in checkpoints], "o-", label="smallest")
    a2.set_xlabel("optimizer step")
    a2.set_ylabel("eigenvalue")
    a2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_spectrum(args) -> dict:
    """``tallskinny spectrum``: train ``args.steps`` steps, the exact spectrum every
    ``args.every`` (checkpoints stop once ``args.budget`` training seconds are used), then
    the histogram of the trained model next to SLQ (module doc)."""
    start = time.perf_counter()
    dtype = torch.float64
    torch.set_num_threads(max(1, args.threads))
    (X_train, y_train), _ = load_digits_data(args.seed, dtype)
    model = deep_mlp(args.depth, args.width, X_train.shape[1], 10, args.seed, dtype)
    Xs, ys = X_train[: args.batch], y_train[: args.batch]
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = (exact_stepper if args.optimizer == "exact" else adam_stepper)(model, (X_train, y_train), args, gen)
    n = math.ceil(args.steps / args.every)
    print(
        f"digits MLP of {args.depth} layers of width {args.width}, {sum(p.numel() for p in model.parameters())} "
        f"parameters; {args.steps} {args.optimizer} steps (at most {args.budget:g} s); exact Hessian spectrum on "
        f"{args.batch} training images every {args.every} steps",
        file=sys.stderr, flush=True,
    )
    checkpoints, elapsed, steps, spectrum_s = [], 0.0, 0, 0.0
    loss = evaluate(model, X_train, y_train)[0]
    bar = ProgressBar("spectrum", n + 1)
    for k in range(n + 1):
        if k:
            if elapsed >= args.budget:
                break
            t0 = time.perf_counter()
            for _ in range(min(args.every, args.steps - steps)):
                step(steps)
                steps += 1
            elapsed += time.perf_counter() - t0
            loss = evaluate(model, X_train, y_train)[0]
            if not math.isfinite(loss):
                raise FloatingPointError(f"{args.optimizer}: the training loss became {loss}")
        t0 = time.perf_counter()
        point = checkpoint_spectrum(model, Xs, ys, args.zero)
        spectrum_s += time.perf_counter() - t0
        point.update(step=steps, time=elapsed, train_loss=loss)
        checkpoints.append(point)
        bar.update(k + 1, f"step {steps}: {point['negative']} negative, λ in [{point['bottom']:.3g}, {point['top']:.3g}]")
    bar.close()
    print(f"{'time (s)':>9}{'step':>7}{'train loss':>12}{'negative':>10}{'smallest':>13}{'largest':>13}")
    for c in checkpoints:
        print(f"{c['time']:>9.1f}{c['step']:>7d}{c['train_loss']:>12.4f}{c['negative']:>10d}{c['bottom']:>13.6g}{c['top']:>13.6g}")
    print(f"exact Hessian spectrum of the trained model on {args.batch} training images:", flush=True)
    picture = spectrum_picture(model, Xs, ys, args)
    print(spectrum_summary(picture))
    total = time.perf_counter() - start
    results = dict(
        model=dict(depth=args.depth, width=args.width, parameters=picture["parameters"], batch=args.batch,
                   optimizer=args.optimizer, seed=args.seed),
        checkpoints=checkpoints, histogram=picture,
        seconds=dict(training=elapsed, checkpoints=spectrum_s, histogram=picture["seconds"]["exact"],
                     slq=picture["seconds"]["slq"], total=total),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectrum.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'spectrum.json'}")
    title = f"digits, {args.depth}-layer tanh MLP of width {args.width}"
    if _write_training_plot(checkpoints, out / "spectrum_training.png",
                            f"{title}: exact Hessian on {args.batch} images along {args.optimizer} training", args.zero):
        print(f"plots: {out / 'spectrum_training.png'}, ", end="")
        _write_histogram(picture, out / "spectrum_histogram.png", f"{title}, trained")
        print(out / "spectrum_histogram.png")
    print(f"total {total:.1f} s (training {elapsed:.1f} s, checkpoints {spectrum_s:.1f} s, histogram "
          f"{picture['seconds']['exact']:.1f} s, SLQ {picture['seconds']['slq']:.2f} s)")
    return results


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
def _spectrum_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", dest="spectrum_batch" if parser.prog.endswith("demo") else "batch", type=int,
                        default=8, help="training images whose loss's Hessian is examined (default 8)")
    parser.add_argument("--bins", type=int, default=50, help="histogram bins, the zero bin included (default 50)")
    parser.add_argument("--zero", type=float, default=1e-4,
                        help="half-width of the zero bin, relative to max|λ| (default 1e-4)")
    parser.add_argument("--slq-probes", type=int, default=1, help="SLQ probe vectors (default 1, as PyHessian)")
    parser.add_argument("--slq-steps", type=int, default=100, help="SLQ Lanczos steps (default 100, as PyHessian)")


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
    demo.add_argument("--no-spectrum", dest="spectrum", action="store_false",
                      help="skip the final exact-spectrum picture (about 20 s)")
    _spectrum_arguments(demo)
    spec = sub.add_parser("spectrum", help="the exact Hessian spectrum of the digits model along training, and vs SLQ")
    spec.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    spec.add_argument("--every", type=int, default=15, help="steps between spectrum checkpoints (default 15)")
    spec.add_argument("--budget", type=float, default=120.0,
                      help="training seconds after which no more checkpoints are made (default 120)")
    spec.add_argument("--out", default="tallskinny-spectrum", help="folder for the JSON and PNGs (default ./tallskinny-spectrum)")
    spec.add_argument("--optimizer", choices=("exact", "adam"), default="exact",
                      help="exact: the demo's exact GGN trust region (default); adam: Adam")
    spec.add_argument("--depth", type=int, default=16, help="number of linear layers (default 16)")
    spec.add_argument("--width", type=int, default=32, help="hidden width (default 32)")
    spec.add_argument("--exact-batch", type=int, default=8, help="curvature batch of the exact optimizer (default 8)")
    spec.add_argument("--gradient-batch", type=int, default=256, help="gradient batch of the exact optimizer (default 256)")
    spec.add_argument("--adam-batch", type=int, default=64, help="mini-batch of Adam (default 64)")
    spec.add_argument("--adam-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    spec.add_argument("--radius", type=float, default=1.0, help="initial trust-region radius (default 1)")
    spec.add_argument("--seed", type=int, default=0)
    spec.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _spectrum_arguments(spec)
    bench = sub.add_parser("bench", help="run bench/chain.py from the source checkout")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to bench/chain.py")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tallskinny demo [--budget S] [--out DIR] …``, ``tallskinny spectrum [--budget S]
    [--every S] [--bins N] …`` or ``tallskinny bench [ARGS…]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" (--help included) goes to bench/chain.py
        return run_bench(argv[1:])
    args = _parser().parse_args(argv)
    positive = ["budget", "radius", "adam_lr", "zero"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0")
    at_least_one = ["depth", "width", "exact_batch", "gradient_batch", "adam_batch", "slq_probes", "slq_steps"]
    at_least_one += ["check_batch", "spectrum_batch"] if args.command == "demo" else ["batch", "steps", "every"]
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-').replace('spectrum-', '')} must be >= 1")
    if args.bins < 3:
        raise SystemExit("error: --bins must be >= 3")
    if not args.zero < 0.5:
        raise SystemExit("error: --zero must be < 0.5 (it is relative to max|λ|)")
    if args.command == "demo" and args.depth < 3:
        raise SystemExit("error: --depth must be >= 3 (the exactness check uses the last three layers)")
    previous = torch.get_default_dtype()
    try:
        run_demo(args) if args.command == "demo" else run_spectrum(args)
    finally:
        torch.set_default_dtype(previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
