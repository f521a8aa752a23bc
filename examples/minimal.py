"""The README's minimal example: (H + εI)^{-1} b for an 8-layer tanh MLP, checked against dense."""

import torch
from torch import nn

import tallskinny as ts

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

layers = []
for _ in range(7):
    layers += [nn.Linear(16, 16), nn.Tanh()]
layers += [nn.Linear(16, 10)]
chain = ts.Chain(layers, loss=nn.CrossEntropyLoss())
X, y = torch.randn(8, 16), torch.randint(0, 10, (8,))

b = torch.randn(sum(p.numel() for p in chain.parameters()))
x = chain.inverse_hvp(X, y, b, damping=1e-3)          # exact, linear in depth

H = chain.curvature(X, y).to_dense()                   # P × P, only for this check
x_dense = torch.linalg.solve(H + 1e-3 * torch.eye(len(b)), b)
print(f"P = {len(b)}, relative error vs dense solve: {((x - x_dense).norm() / x_dense.norm()):.1e}")
