"""Benchmark of the plugin blocks: ``inverse_hvp`` with the analytic rules of
tallskinny-conv / tallskinny-residual, with the ``torch.func`` fallback for the same
modules, and one autograd Hessian-vector product of the plain model.

    python bench/plugins.py                 # the two networks of issue 5, medians of 5
    python bench/plugins.py --reps 3 --mlp-units 2   # quicker
    python bench/plugins.py --cnn-batch 4   # and the tanh CNN at batch 4 (Hessian, no fallback)
    python bench/plugins.py --mixed --cnn-batch 4   # and the CNNs with precision="mixed"

Networks (float64, batch 1, one thread, ``damping = 1e-3``):

* ``cnn``: 8 × ``Conv2d(8, 8, 3, padding=1)`` with tanh on ``8 × 8`` inputs with 8
  channels, then ``Flatten`` and ``Linear(512, 10)``, cross-entropy; ``cnn-relu`` the
  same with ReLU (dead units leave the span of each stage, channel by channel);
* ``resmlp``: ``Linear(16, 32)``, 32 residual units ``z + W tanh(z) + b``
  (``Residual([Tanh(), Linear(32, 32)])``), ``Linear(32, 10)``, cross-entropy;
* ``resmlp2`` (``--mlp-units``, default 8, one repetition): units
  ``Residual([Linear, Tanh, Linear])`` (width 32), whose parameters interact inside
  the unit (``A ≠ 0`` of size ``2112 × 2112``, of rank ≤ 96: a ``LowRank``).

``GFLOP`` is the analytic chain's elimination (one factorization and one solve,
``Curvature.elimination_flops``), ``floor`` those flops at the float64 GEMM rate of
``n × n`` matrices (``n`` the largest stage size) measured in the same run, ``an/floor``
the analytic ``inverse_hvp`` time over it and ``an/lower`` over the floor of the lower
bound of the flops.

"fallback" wraps the plugin modules (convolutions, residual units) in
``tallskinny.blocks.FuncBlock``; everything else is the same chain. Each solve is
checked against the fallback's (relative difference printed).

``--mixed`` also times each CNN's ``inverse_hvp`` path with ``precision="mixed"`` (the
curvature, float32 factors, the float64 GMRES refinement; float64 factors where that
stalls) and prints its time against the float64 path's and the fallback's, the precision
it ended on and its refinement steps; with ``--cnn-batch`` the ReLU CNN at that batch too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import tallskinny as ts
from tallskinny.blocks import FuncBlock

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper _flops, also when loaded by path
    sys.path.append(str(Path(__file__).resolve().parent))
from _flops import flop_floor  # noqa: E402

try:
    import tallskinny_conv  # noqa: F401  (the conv blocks come through its entry point)
    from tallskinny_residual import Residual
except ImportError as err:  # pragma: no cover
    raise SystemExit(f"install the plugins first: pip install -e plugins/tallskinny-conv -e plugins/tallskinny-residual ({err})")


def cnn(activation=nn.Tanh, batch: int = 1) -> tuple[list[nn.Module], torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Conv2d(8, 8, 3, padding=1), activation()]
    return layers + [nn.Flatten(), nn.Linear(8 * 8 * 8, 10)], torch.randn(batch, 8, 8, 8)


def residual_mlp(units: int, two_layer: bool) -> tuple[list[nn.Module], torch.Tensor]:
    def unit():
        if two_layer:
            return Residual([nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32)])
        return Residual([nn.Tanh(), nn.Linear(32, 32)])

    return [nn.Linear(16, 32)] + [unit() for _ in range(units)] + [nn.Linear(32, 10)], torch.randn(1, 16)


def one_hvp(modules, loss_fn, X, y, v):
    """One Hessian-vector product of the plain model by double backward."""
    params = [p for m in modules for p in m.parameters()]
    z = X
    for m in modules:
        z = m(z)
    grads = torch.autograd.grad(loss_fn(z, y), params, create_graph=True)
    dot = sum((g.reshape(-1) * vi).sum() for g, vi in zip(grads, v.split([p.numel() for p in params])))
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])


def timed(fn, reps: int) -> tuple[float, object]:
    """Median wall time of ``reps`` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(name: str, modules, X, plugin_types, reps: int, damping: float, with_fallback: bool = True,
        with_mixed: bool = False) -> dict:
    loss = nn.CrossEntropyLoss()
    y = (3 + 7 * torch.arange(X.shape[0])) % 10  # class 3 at batch 1, as before
    analytic = ts.Chain(modules, loss)
    fallback = ts.Chain([FuncBlock(m) if isinstance(m, plugin_types) else m for m in modules], loss)
    P = sum(p.numel() for p in analytic.parameters())
    b = torch.randn(P)
    t_analytic, x = timed(lambda: analytic.inverse_hvp(X, y, b, damping=damping), reps)
    t_hvp, _ = timed(lambda: one_hvp(modules, loss, X, y, b), reps)
    # the part the block rules decide: forward and every oracle (no elimination)
    t_oracles, _ = timed(lambda: analytic.curvature(X, y), reps)
    if with_fallback:
        t_fallback, x_fb = timed(lambda: fallback.inverse_hvp(X, y, b, damping=damping), reps)
        t_oracles_fb, _ = timed(lambda: fallback.curvature(X, y), reps)
        diff = float((x - x_fb).norm() / x_fb.norm())
    else:  # (minutes: torch.func's Jacobians of every block at this size)
        t_fallback = t_oracles_fb = diff = float("nan")
    curvature = analytic.curvature(X, y)
    floor = dict(flop_floor(curvature, max(reps, 3)), route=curvature.method)
    mixed = None
    if with_mixed:  # float32 factors, refined in float64 to the same backward error

        def mixed_solve():
            curv = analytic.curvature(X, y)
            fact = curv.factorize(damping, precision="mixed")
            return fact.solve(b), fact.precision, curv.checks.refinements

        t_mixed, (x_mixed, ended, steps) = timed(mixed_solve, reps)
        mixed = dict(seconds=t_mixed, ended=ended, steps=steps, diff=float((x_mixed - x).norm() / x.norm()))
    return dict(name=name, P=P, analytic=t_analytic, fallback=t_fallback, hvp=t_hvp, diff=diff, reps=reps,
                oracles=t_oracles, oracles_fb=t_oracles_fb, floor=floor, mixed=mixed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median), default 5")
    parser.add_argument("--mlp-units", type=int, default=8, help="units of the Linear–Tanh–Linear residual MLP (0: skip; its fallback takes ~2 s per unit)")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--cnn-batch", type=int, default=0, help="also the tanh CNN at this batch size (one repetition, no fallback; 4: 10–15 s)")
    parser.add_argument("--mixed", action="store_true",
                        help="also the CNNs' inverse_hvp with precision='mixed' (and, with --cnn-batch, the ReLU CNN at that batch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)

    rows = [run("cnn (8 conv, 8 ch, 8×8)", *cnn(), (nn.Conv2d,), args.reps, args.damping, with_mixed=args.mixed)]
    rows.append(run("cnn-relu (the same with ReLU)", *cnn(nn.ReLU), (nn.Conv2d,), args.reps, args.damping,
                    with_mixed=args.mixed))
    if args.cnn_batch:
        rows.append(run(f"cnn batch {args.cnn_batch} (no fallback)", *cnn(batch=args.cnn_batch), (nn.Conv2d,), 1,
                        args.damping, with_fallback=False, with_mixed=args.mixed))
        if args.mixed:
            rows.append(run(f"cnn-relu batch {args.cnn_batch} (no fallback)", *cnn(nn.ReLU, args.cnn_batch), (nn.Conv2d,),
                            1, args.damping, with_fallback=False, with_mixed=True))
    rows.append(run("resmlp (32 × [Tanh, Linear])", *residual_mlp(32, False), (Residual,), args.reps, args.damping))
    if args.mlp_units:
        rows.append(run(f"resmlp2 ({args.mlp_units} × [Linear, Tanh, Linear])", *residual_mlp(args.mlp_units, True),
                        (Residual,), 1, args.damping))

    print(f"torch {torch.__version__}, float64, 1 thread, batch 1 (unless named), damping {args.damping:g}; medians, ms")
    print("inverse_hvp: analytic rules (an) vs torch.func fallback (fb) vs one autograd HVP; "
          "oracles: chain.curvature() alone (forward pass, every block's oracle)")
    header = (f"{'network':36} {'P':>6} {'an':>8} {'fb':>8} {'HVP':>7} {'fb/an':>6} {'an/HVP':>7} "
              f"{'oracles an':>10} {'oracles fb':>10} {'fb/an':>6} {'|Δx|/|x|':>9} reps "
              f"{'GFLOP':>7} {'floor':>7} {'an/floor':>8} {'an/lower':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:36} {r['P']:6d} {r['analytic'] * 1e3:8.1f} {r['fallback'] * 1e3:8.1f} {r['hvp'] * 1e3:7.2f} "
            f"{r['fallback'] / r['analytic']:6.1f} {r['analytic'] / r['hvp']:7.1f} {r['oracles'] * 1e3:10.1f} "
            f"{r['oracles_fb'] * 1e3:10.1f} {r['oracles_fb'] / r['oracles']:6.1f} {r['diff']:9.1e} {r['reps']:4d} "
            f"{r['floor']['flops'] / 1e9:7.3f} {r['floor']['floor_seconds'] * 1e3:7.1f} "
            f"{r['analytic'] / r['floor']['floor_seconds']:8.1f} {r['analytic'] / r['floor']['lower_floor_seconds']:8.1f}"
        )
    mixed_rows = [r for r in rows if r["mixed"] is not None]
    if mixed_rows:
        print()
        print("precision='mixed' (float32 factors, GMRES refinement in float64 to the same 64·eps backward error; "
              "float64 factors where it stalls), same run:")
        for r in mixed_rows:
            m = r["mixed"]
            vs_fallback = f"  fb/mixed {r['fallback'] / m['seconds']:5.1f}" if r["fallback"] == r["fallback"] else ""
            print(f"  {r['name']:36} {m['seconds'] * 1e3:8.1f} ms  mixed/an {m['seconds'] / r['analytic']:5.2f}{vs_fallback}  "
                  f"ended {m['ended']:5}  refinements {m['steps']:2d}  |x_mixed − x|/|x| {m['diff']:.1e}")
    print()
    print("flop floor: GFLOP = one factorization + one solve (lower: without redundancy, "
          "GFLOP given as count / lower); GEMM = float64 (float32) torch.mm on n × n, 1 thread, this run")
    for r in rows:
        f = r["floor"]
        print(f"  {r['name']:36} route {f['route']:8} GFLOP {f['flops'] / 1e9:.3f} / {f['lower_flops'] / 1e9:.3f}  "
              f"n = {f['size']:4d}  GEMM {f['gemm_rate'] / 1e9:6.2f} ({f['gemm_rate_float32'] / 1e9:6.2f}) GFLOP/s  "
              f"floor {f['floor_seconds'] * 1e3:.1f} ms (lower {f['lower_floor_seconds'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
