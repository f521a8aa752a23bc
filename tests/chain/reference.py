"""Dense references for chain tests: torch.func.hessian of the plain PyTorch loss."""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev


def _flat_loss(chain, inputs, targets):
    params = list(chain.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    names = []
    for m, ps in zip(chain.modules, chain._params):
        by_id = {id(p): n for n, p in m.named_parameters()}
        names.append([by_id[id(p)] for p in ps])

    def unflatten(theta):
        pieces = [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        out, k = [], 0
        for ns in names:
            out.append({n: pieces[k + j] for j, n in enumerate(ns)})
            k += len(ns)
        return out

    def outputs(theta):
        z = inputs
        for m, d in zip(chain.modules, unflatten(theta)):
            z = functional_call(m, d, (z,))
        return z

    def loss(theta):
        return chain.loss(outputs(theta), targets)

    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    return loss, outputs, theta0


def dense_hessian(chain, inputs, targets):
    loss, _, theta0 = _flat_loss(chain, inputs, targets)
    H = hessian(loss)(theta0)
    return 0.5 * (H + H.mT)


def dense_ggn(chain, inputs, targets):
    _, outputs, theta0 = _flat_loss(chain, inputs, targets)
    z = outputs(theta0).detach()
    J = jacrev(outputs)(theta0).reshape(z.numel(), -1)
    Hl = hessian(lambda zz: chain.loss(zz.reshape(z.shape), targets))(z.reshape(-1))
    G = J.mT @ Hl @ J
    return 0.5 * (G + G.mT)


def dense_gradient(chain, inputs, targets):
    loss, _, theta0 = _flat_loss(chain, inputs, targets)
    return torch.func.grad(loss)(theta0)
