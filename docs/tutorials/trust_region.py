"""Tutorial: an exact trust-region method on an indefinite Hessian.

A deep, narrow tanh network fits a 1-D function. The Hessian of the loss is indefinite
almost everywhere along the way; `TrustRegion(kind="hessian")` solves each subproblem
`min gᵀs + ½sᵀHs, ‖s‖ ≤ Δ` exactly, following negative curvature where there is some.
At the end one subproblem is checked against a dense eigendecomposition.
"""

import time

import torch
from torch import nn

import tallskinny as ts
from tallskinny.optim import TrustRegion
from tallskinny.trust_region import solve_subproblem

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

X = torch.linspace(-2, 2, 8).unsqueeze(1)
Y = torch.sin(2 * X) + 0.3 * X
layers = [nn.Linear(1, 8), nn.Tanh()]
for _ in range(3):
    layers += [nn.Linear(8, 8), nn.Tanh()]
layers += [nn.Linear(8, 1)]
chain = ts.Chain(layers, loss=nn.MSELoss())
P = sum(p.numel() for p in chain.parameters())

opt = TrustRegion(chain, kind="hessian", radius=0.5)
start = time.perf_counter()
print(f"{P} parameters, 8 points; exact trust region on the Hessian")
for it in range(12):
    opt.step((X, Y))
    s = opt.last_step
    if it % 3 == 0 or it == 11:
        print(
            f"step {it:2d}: loss {s.new_loss:.2e}  ratio {s.ratio:5.2f}  radius {s.radius:.2g}  "
            f"λ {s.damping:.2e}  factorizations {s.factorizations}"
        )
final_loss = float(chain(X, Y).detach())
print(f"final loss {final_loss:.3e} after {time.perf_counter() - start:.1f} s")

# the curvature at the end: indefinite? and one subproblem against the dense eigendecomposition
curv = chain.curvature(X, Y)
inertia = curv.factorize(1e-6).inertia()
print(f"inertia of H + 1e-6·I at the end: {inertia.positive} positive, {inertia.negative} negative, {inertia.zero} zero")
g, radius = curv.gradient(), 0.1
result = solve_subproblem(curv, g, radius)
H = curv.to_dense()
evals, Q = torch.linalg.eigh(H)
c = Q.T @ g


def norm_at(lam):
    return float((c / (evals + lam)).norm())


lo, hi = max(0.0, -float(evals[0])) + 1e-14, max(0.0, -float(evals[0])) + float(g.norm()) / radius + float(evals.abs().max())
for _ in range(200):  # bisection on the dense secular equation
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if norm_at(mid) > radius else (lo, mid)
lam_dense = 0.5 * (lo + hi)
subproblem_error = abs(result.multiplier - lam_dense) / lam_dense
print(f"subproblem: λ = {result.multiplier:.10g} (dense eigendecomposition {lam_dense:.10g}), ‖s‖/Δ = {float(result.step.norm()) / radius:.12f}")
