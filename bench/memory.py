"""Memory: the estimates of ``tallskinny.resources`` against the measured peak.

The peak is that of the new allocations of one call. CPU: each case runs in a fresh
process; the peak is ``VmHWM`` (reset through ``/proc/self/clear_refs``) less the resident
memory before the call, large allocations made by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so
that a free gives them back at once. CUDA: ``torch.cuda.max_memory_allocated`` less the
memory allocated before the call. float64, one thread, after a warm-up at one sample.

    python bench/memory.py                  # CPU (Linux), the default cases
    python bench/memory.py --device cuda    # on a GPU, with larger cases
    python bench/memory.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

import tallskinny as ts


class Fallback(nn.Module):
    """An unregistered module with parameters: the ``torch.func`` fallback."""

    def __init__(self, h: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(h, h) / h**0.5)
        self.b = nn.Parameter(torch.zeros(h))

    def forward(self, x):
        return torch.tanh(x @ self.W.T + self.b)


def mlp(widths, act=nn.Tanh):
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), act()]
    return layers + [nn.Linear(widths[-2], widths[-1])]


def cnn(act=nn.Tanh):
    from tallskinny_conv import register_blocks

    register_blocks()  # (where the plugin is on the path but not installed)
    return [nn.Conv2d(3, 16, 3, padding=1), act(), nn.Conv2d(16, 16, 3, padding=1), act(), nn.Flatten(),
            nn.Linear(1024, 10)]


def residual():
    from tallskinny_residual import Residual, register_blocks

    register_blocks()
    return [nn.Linear(16, 64), Residual([nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)]), nn.Tanh(), nn.Linear(64, 10)]


# name: (modules, input shape, classes (0: MSE with 64 outputs), phases)
FULL = ("curvature", "factorize hessian 1e-3", "factorize ggn 1e-3")
CASES = {
    "mlp 32-256-256-10, B=16": (lambda: mlp([32, 256, 256, 10]), (16, 32), 10, FULL),
    "mlp 32-128x4-10, B=32": (lambda: mlp([32, 128, 128, 128, 128, 10]), (32, 32), 10, FULL),
    "relu mlp 32-128x4-10, B=32": (lambda: mlp([32, 128, 128, 128, 128, 10], nn.ReLU), (32, 32), 10, FULL),
    "cnn 3-16-16 8x8, B=4": (cnn, (4, 3, 8, 8), 10, FULL),
    "relu cnn 3-16-16 8x8, B=4": (lambda: cnn(nn.ReLU), (4, 3, 8, 8), 10, FULL),
    "fallback 48x2, B=16": (lambda: [nn.Linear(32, 48), nn.Tanh(), Fallback(48), Fallback(48), nn.Linear(48, 10)],
                            (16, 32), 10, FULL + ("to_dense",)),
    "layernorm 128, B=16": (lambda: [nn.Linear(32, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 128),
                                     nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 10)], (16, 32), 10, FULL),
    "residual 64, B=8": (residual, (8, 16), 10, FULL),
    "mse 64-256-64, B=16": (lambda: mlp([64, 256, 64]), (16, 64), 0, FULL),
    "mlp 64x3, B=2 (KKT)": (lambda: mlp([64, 64, 64, 64, 10]), (2, 64), 10, ("factorize hessian 0",)),
    "mlp 16-64-64-10, B=8": (lambda: mlp([16, 64, 64, 10]), (8, 16), 10, ("to_dense",)),
}
LARGE = {  # CUDA only
    "mlp 32-512-512-10, B=16": (lambda: mlp([32, 512, 512, 10]), (16, 32), 10, FULL),
    "mlp 32-512x3-10, B=32": (lambda: mlp([32, 512, 512, 512, 10]), (32, 32), 10, FULL),
    "cnn 3-16-16 16x16, B=4": (lambda: cnn()[:-1] + [nn.Linear(4096, 10)], (4, 3, 16, 16), 10, FULL),
    "mlp 64-128-128-10, B=8": (lambda: mlp([64, 128, 128, 10]), (8, 64), 10, ("to_dense",)),
}


def build(name: str, device: str):
    make, shape, classes, _ = {**CASES, **LARGE}[name]
    torch.manual_seed(0)
    modules = [m.to(device=device, dtype=torch.float64) for m in make()]
    X = torch.randn(*shape, device=device, dtype=torch.float64)
    if classes:
        return ts.Chain(modules, nn.CrossEntropyLoss()), X, torch.randint(0, classes, shape[:1], device=device)
    return ts.Chain(modules, nn.MSELoss()), X, torch.randn(shape[0], 64, device=device, dtype=torch.float64)


def refused_estimate(call) -> int:
    """The estimate that a call makes, read off its refusal at a limit of one byte."""
    try:
        call()
    except ts.ResourceError as err:
        return err.estimate
    raise AssertionError("not refused at a limit of one byte")


def peak(fn, device: str) -> tuple[int, float]:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM ← VmRSS
        base = _status("VmRSS")
    t = time.perf_counter()
    try:
        fn()
    except ts.SingularSystemError:  # at ε = 0 the KKT system may be singular: the work was done
        pass
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, time.perf_counter() - t
    return _status("VmHWM") - base, time.perf_counter() - t


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def one(name: str, phase: str, device: str) -> dict:
    """Estimate and measured peak of one call."""
    chain, X, y = build(name, device)
    what, *rest = phase.split()
    kind, damping = (rest[0], float(rest[1])) if rest else ("hessian", 1e-3)
    chain.curvature(X[:1], y[:1], kind=kind).factorize(1e-2)  # torch's own first-use allocations
    if what == "curvature":
        estimate = refused_estimate(lambda: chain.curvature(X, y, kind=kind, memory_limit=1))
        actual, seconds = peak(lambda: chain.curvature(X, y, kind=kind), device)
    else:
        curv = chain.curvature(X, y, kind=kind)
        if what == "factorize":
            estimate = curv.factorization_memory(damping).total
            actual, seconds = peak(lambda: curv.factorize(damping), device)
        else:
            curv.memory_limit = 1
            estimate = refused_estimate(curv.to_dense)
            curv.memory_limit = None
            actual, seconds = peak(curv.to_dense, device)
    return dict(case=name, phase=phase, estimate=estimate, actual=actual, ratio=estimate / max(actual, 1),
                seconds=round(seconds, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--only", help="cases whose name contains this")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(one(*args.one, args.device)))
        return
    cases = {**CASES, **(LARGE if args.device == "cuda" else {})}
    rows = []
    print(f"{'case':30s} {'call':24s} {'estimate':>10s} {'peak':>10s} {'ratio':>6s} {'seconds':>8s}")
    for name, (_, _, _, phases) in cases.items():
        if args.only and args.only not in name:
            continue
        for phase in phases:
            if args.device == "cuda":
                row = one(name, phase, "cuda")
            else:  # a fresh process per call: its peak is its own
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
                           PYTHONPATH=os.pathsep.join(sys.path))
                done = subprocess.run([sys.executable, __file__, "--one", name, phase], env=env, capture_output=True,
                                      text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:30s} {phase:24s} {row['estimate'] / 1e6:8.1f}MB {row['actual'] / 1e6:8.1f}MB "
                  f"{row['ratio']:6.2f} {row['seconds']:8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
