"""Tutorial: finding mislabelled training examples with exact influence functions.

Two Gaussian blobs, two training labels flipped. After training, the *self-influence*
`I(z_i, z_i) = −∇ℓ_iᵀ (H + εI)⁻¹ ∇ℓ_i` (how much up-weighting an example changes its own
loss) is most negative for the examples the model has to bend to fit: the two flipped ones
are among the three most self-influential (the third lies close to the other blob).
The inverse Hessian is exact (one factorization for all examples).
"""

import torch
from torch import nn

import tallskinny as ts
from tallskinny.influence import influence
from tallskinny.optim import DampedNewton

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

n = 12
y = torch.arange(n) % 2
X = torch.randn(n, 2) * 0.7 + torch.stack([2.0 * y - 1.0, torch.zeros(n)], dim=1)
flipped = [3, 8]
y_noisy = y.clone()
y_noisy[flipped] = 1 - y_noisy[flipped]

layers = [nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)]
chain = ts.Chain(layers, loss=nn.CrossEntropyLoss())
opt = DampedNewton(chain, kind="ggn", damping=1.0)
for _ in range(3):
    opt.step((X, y_noisy))
print(f"training loss after 3 Levenberg–Marquardt steps: {float(chain(X, y_noisy).detach()):.4f}")

scores = influence(chain, (X, y_noisy), (X, y_noisy), damping=1e-2, kind="ggn")  # (n, n)
self_influence = torch.diagonal(scores)
order = self_influence.argsort()  # most negative first
print("self-influence, most negative first:")
for i in order[:5].tolist():
    mark = "  <- flipped label" if i in flipped else ""
    print(f"  example {i:2d}: {float(self_influence[i]): .4f}{mark}")
top = set(order[:3].tolist())
print(f"flipped examples among the 3 most self-influential: {len(top & set(flipped))} of {len(flipped)}")
