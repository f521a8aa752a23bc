"""A small chain and an independent dense description of its loss (torch.func on nn.Sequential)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import tallskinny as ts


def small_model(act=nn.Tanh, seed=0, d_in=3, width=5, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out))


class DenseModel:
    """``loss(θ)`` and outputs of ``model`` as functions of the flat ``θ``, for references."""

    def __init__(self, model: nn.Sequential, loss: nn.Module):
        self.model, self.loss = model, loss
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(self, theta):
        pieces = torch.split(theta, [s.numel() for s in self.shapes])
        return {n: piece.view(s) for n, piece, s in zip(self.names, pieces, self.shapes)}

    def output(self, theta, X):
        return functional_call(self.model, self.params(theta), (X,))

    def loss_at(self, theta, X, y):
        return self.loss(self.output(theta, X), y)

    def hessian(self, X, y):
        return torch.func.hessian(lambda t: self.loss_at(t, X, y))(self.theta)

    def ggn(self, X, y):
        J = torch.func.jacrev(lambda t: self.output(t, X).reshape(-1))(self.theta)
        z = self.output(self.theta, X).detach()
        E = torch.func.hessian(lambda zz: self.loss(zz.view_as(z), y))(z.reshape(-1))
        return J.T @ E @ J

    def gradient(self, X, y):
        return torch.func.grad(lambda t: self.loss_at(t, X, y))(self.theta)

    def per_example_gradients(self, X, y):
        return torch.stack([self.gradient(X[i : i + 1], y[i : i + 1]) for i in range(len(X))])

    def output_jacobian(self, X):
        J = torch.func.jacrev(lambda t: self.output(t, X))(self.theta)  # (n, d, P)
        return J


def chain_of(model: nn.Sequential, loss: nn.Module) -> ts.Chain:
    return ts.Chain.from_sequential(model, loss)
