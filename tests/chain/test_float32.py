"""float32: relative error ≤ 1e-3 against a float64 dense solve where cond(H + εI) ≤ 1e4."""

from __future__ import annotations

import torch

import tallskinny as ts
from models import make_case
from tallskinny.testing import dense_hessian

NAMES = ["tanh", "relu", "gelu", "sigmoid", "silu", "mse_mean", "fallback", "no_bias"]


def test_float32_over_many_seeds():
    tested = 0
    worst = 0.0
    for seed in range(140):
        name = NAMES[seed % len(NAMES)]
        modules32, loss, X32, y = make_case(name, seed, dtype=torch.float32)
        chain32 = ts.Chain(modules32, loss)
        y32 = y.to(torch.float32) if y.dtype.is_floating_point else y
        # the float64 reference of the same (float32-valued) model
        modules64 = [_copy64(m) for m in modules32]
        chain64 = ts.Chain(modules64, loss)
        y64 = y.to(torch.float64) if y.dtype.is_floating_point else y
        H = dense_hessian(chain64, X32.double(), y64)
        P = H.shape[0]
        damping = [1e-2, 1e-1, 1.0][seed % 3]
        M = H + damping * torch.eye(P, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(M)
        if (eig.abs().max() / eig.abs().min()).item() > 1e4:
            continue
        b = torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x = chain32.inverse_hvp(X32, y32, b.float(), damping=damping)
        assert x.dtype == torch.float32
        ref = torch.linalg.solve(M, b)
        err = ((x.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        assert err <= 1e-3, (name, seed, err)
        tested += 1
    assert tested >= 100, tested


def _copy64(m):
    import copy

    return copy.deepcopy(m).to(torch.float64)
