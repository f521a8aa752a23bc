"""Smoke test of bench/plugins.py on tiny networks: it must not rot, and its analytic and
fallback solves must agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[3] / "bench" / "plugins.py"


def test_bench_plugins_core_runs():
    pytest.importorskip("tallskinny_residual")
    spec = importlib.util.spec_from_file_location("bench_plugins", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    modules = [nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4)]
    row = bench.run("tiny cnn", modules, torch.randn(1, 1, 3, 3), (nn.Conv2d,), 1, 1e-2)
    assert row["P"] == 2 * 9 + 2 + 18 * 4 + 4
    assert row["diff"] < 1e-9 and min(row["analytic"], row["fallback"], row["hvp"], row["oracles"]) > 0
    layers, X = bench.residual_mlp(2, two_layer=False)
    assert sum(isinstance(m, bench.Residual) for m in layers) == 2 and X.shape == (1, 16)
    # one HVP of the plain model is right
    v = torch.randn(row["P"])
    loss = nn.CrossEntropyLoss()
    y = torch.tensor([3])
    params = [p for m in modules for p in m.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(theta):
        pieces = iter(theta.split([p.numel() for p in params]))
        z = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(1))
        for m in modules:
            z = torch.func.functional_call(m, {n: next(pieces).reshape(q.shape) for n, q in m.named_parameters()}, (z,))
        return loss(z, y)

    X1 = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    H = torch.func.jacrev(torch.func.grad(f))(flat)
    torch.testing.assert_close(bench.one_hvp(modules, loss, X1, y, v), H @ v, rtol=1e-10, atol=1e-12)


def test_bench_plugins_mixed_precision_row():
    """``--mixed``: the row carries the mixed-precision solve's time, the precision it ended
    on and its refinements, and its answer equals the float64 path's."""
    pytest.importorskip("tallskinny_residual")
    spec = importlib.util.spec_from_file_location("bench_plugins", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    modules = [m.double() for m in (nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))]
    X = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    row = bench.run("tiny cnn", modules, X, (nn.Conv2d,), 1, 1e-2, with_fallback=False, with_mixed=True)
    mixed = row["mixed"]
    # a well-conditioned problem: it stays in float32 and refines at least once (a float32
    # solve's backward error is far above 64·eps of float64)
    assert mixed["ended"] == "mixed" and mixed["steps"] >= 1
    assert mixed["diff"] < 1e-10
    assert bench.run("tiny cnn", modules, X, (nn.Conv2d,), 1, 1e-2, with_fallback=False)["mixed"] is None
