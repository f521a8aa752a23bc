"""CUDA check: exactness of the chain on a GPU against dense linear algebra there.

Run on a machine with a CUDA GPU (``python bench/cuda_check.py``); then the benchmark table
with ``python bench/chain.py --device cuda``. Prints one line per check and exits non-zero
if any check fails.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import tallskinny as ts


def check(name, dtype, act, B, tol, damping):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), act()]
    for _ in range(3):
        layers += [nn.Linear(8, 8), act()]
    layers += [nn.Linear(8, 5)]
    layers = [m.to(device="cuda", dtype=dtype) for m in layers]
    chain = ts.Chain(layers, nn.CrossEntropyLoss())
    X = torch.randn(B, 6, device="cuda", dtype=dtype)
    y = torch.randint(0, 5, (B,), device="cuda")
    curv = chain.curvature(X, y)
    H = curv.to_dense().double()
    P = H.shape[0]
    M = H + damping * torch.eye(P, device="cuda", dtype=torch.float64)
    b = torch.randn(P, device="cuda", dtype=torch.float64)
    fact = curv.factorize(damping)
    x = fact.solve(b.to(dtype))
    ref = torch.linalg.solve(M, b)
    err = ((x.double() - ref).norm() / ref.norm()).item()
    eig = torch.linalg.eigvalsh(M)
    inertia = ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
    ok = err <= tol and (dtype == torch.float32 or tuple(fact.inertia()) == inertia)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: P={P} relative error {err:.1e} (tol {tol:g}), "
          f"inertia {tuple(fact.inertia())} vs dense {inertia}, device {x.device}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    results = [
        check("tanh float64 B=1", torch.float64, nn.Tanh, 1, 1e-9, 1e-3),
        check("tanh float64 B=4", torch.float64, nn.Tanh, 4, 1e-9, 1e-3),
        check("relu float64 B=3", torch.float64, nn.ReLU, 3, 1e-9, 1e-2),
        check("tanh float32 B=2", torch.float32, nn.Tanh, 2, 1e-3, 1e-1),
    ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
