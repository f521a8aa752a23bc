"""Quickstart: exact curvature of a small deep network, checked against dense linear algebra.

Run:  python examples/quickstart.py
"""

import torch
from torch import nn

import tallskinny as ts
from tallskinny.linalg import SymmetricBlockTridiagonal

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

# 1. A structured system on its own: 200 ragged blocks, indefinite, first block singular.
sizes = [int(s) for s in torch.randint(1, 9, (200,))]
diagonal = []
for n in sizes:
    M = torch.randn(n, n)
    diagonal.append(M + M.T)
diagonal[0] = torch.zeros(sizes[0], sizes[0])
lower = [torch.randn(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]
K = SymmetricBlockTridiagonal(diagonal, lower)
b = torch.randn(K.shape[0])
fact = K.factorize()
x = fact.solve(b)
x_dense = torch.linalg.solve(K.to_dense(), b)
print(f"linalg: N={K.shape[0]} in {len(sizes)} blocks, inertia={tuple(fact.inertia())}")
print(f"  relative residual {((K @ x - b).norm() / b.norm()).item():.1e}, "
      f"difference to dense solve {((x - x_dense).norm() / x_dense.norm()).item():.1e}")

# 2. A deep narrow network: (H + εI)^{-1} b exactly, without forming H.
layers = [nn.Linear(8, 16), nn.Tanh()]
for _ in range(6):
    layers += [nn.Linear(16, 16), nn.Tanh()]
layers += [nn.Linear(16, 10)]
chain = ts.Chain(layers, loss=nn.CrossEntropyLoss())
X, y = torch.randn(4, 8), torch.randint(0, 10, (4,))

curv = chain.curvature(X, y)                 # one forward + one backward pass
P = curv.num_parameters
b = torch.randn(P)
fact = curv.factorize(damping=1e-3)          # reusable across right-hand sides
x = fact.solve(b)
H = curv.to_dense()                          # only for the check below
x_dense = torch.linalg.solve(H + 1e-3 * torch.eye(P), b)
eig = torch.linalg.eigvalsh(H + 1e-3 * torch.eye(P))
print(f"chain: {len(layers)} modules, P={P} parameters, inertia of H+εI = {tuple(fact.inertia())} "
      f"(dense: {(eig > 0).sum().item()} positive, {(eig < 0).sum().item()} negative)")
print(f"  inverse-HVP vs dense solve: relative error {((x - x_dense).norm() / x_dense.norm()).item():.1e}")
print(f"  log|det(H+εI)| = {fact.logdet().item():.10f} (dense {eig.abs().log().sum().item():.10f})")
