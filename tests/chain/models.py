"""Small chains covering every built-in block and loss, plus fallback blocks."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "sigmoid": nn.Sigmoid,
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.0),
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


class ScaledSine(nn.Module):
    """An unregistered module (torch.func fallback): ``a ⊙ sin(x) + x @ M``."""

    def __init__(self, width: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(width))
        self.M = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x):
        return self.a * torch.sin(x) + x @ self.M


class BatchMix(nn.Module):
    """An unregistered module whose samples interact: ``s ⊙ tanh(x - mean_batch(x))``."""

    def __init__(self, width: int):
        super().__init__()
        self.s = nn.Parameter(1.0 + 0.1 * torch.randn(width))

    def forward(self, x):
        return self.s * torch.tanh(x - x.mean(dim=0, keepdim=True) + 0.3 * x)


def log_cosh_loss(z, target):
    """A loss callable that is not a module (torch.func fallback for the loss)."""
    return torch.log(torch.cosh(z - target)).mean()


def mlp(depth, width, d_in, d_out, act="tanh", bias=True, gen=None):
    layers = []
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < depth - 1:
            layers.append(ACTIVATIONS[act]())
    return layers


def targets_for(loss, z_shape, gen):
    if isinstance(loss, nn.CrossEntropyLoss):
        return torch.randint(0, z_shape[-1], z_shape[:-1], generator=gen)
    return torch.randn(z_shape, generator=gen)


def make_case(name: str, seed: int, dtype=torch.float64):
    """Returns ``(modules, loss, inputs, targets)`` for a named case; random but seeded."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    depth = 1 + seed % 4
    width = 1 + (3 * seed) % 6
    batch = 1 + (seed * 7) % 5
    d_in, d_out = 3, 4
    loss = nn.CrossEntropyLoss()
    input_shape = (batch, d_in)
    if name in ACTIVATIONS:
        modules = mlp(depth + 1, width + 1, d_in, d_out, act=name)
    elif name == "deep":
        modules = mlp(8, 3, d_in, d_out, act="tanh")
    elif name == "wide":
        modules = mlp(2, 8, d_in, d_out, act="tanh")
    elif name == "no_bias":
        modules = mlp(depth + 1, width + 1, d_in, d_out, bias=False)
    elif name == "width_one":
        modules = mlp(3, 1, 1, 2, act="tanh")
        input_shape = (batch, 1)
    elif name == "flatten":
        modules = [nn.Flatten(), nn.Linear(6, width + 1), nn.Tanh(), nn.Linear(width + 1, d_out)]
        input_shape = (batch, 2, 3)
    elif name in ("ce_sum", "mse_mean", "mse_sum", "callable_loss"):
        loss = {
            "ce_sum": nn.CrossEntropyLoss(reduction="sum"),
            "mse_mean": nn.MSELoss(),
            "mse_sum": nn.MSELoss(reduction="sum"),
            "callable_loss": log_cosh_loss,
        }[name]
        modules = mlp(depth + 1, width + 1, d_in, d_out, act="tanh")
    elif name == "fallback":
        modules = [nn.Linear(d_in, 4), ScaledSine(4), nn.Tanh(), nn.Linear(4, d_out)]
    elif name == "interacting":
        batch = max(batch, 2)
        input_shape = (batch, d_in)
        modules = [nn.Linear(d_in, 4), BatchMix(4), nn.Linear(4, d_out)]
    else:
        raise KeyError(name)
    modules = [m.to(dtype) for m in modules]
    # larger weights make the Hessian strongly indefinite
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.mul_(1.5)
    inputs = torch.randn(input_shape, generator=gen, dtype=dtype)
    out = inputs
    with torch.no_grad():
        for m in modules:
            out = m(out)
    targets = targets_for(loss, out.shape, gen)
    if targets.dtype.is_floating_point:
        targets = targets.to(dtype)
    return modules, loss, inputs, targets


CASES = list(ACTIVATIONS) + [
    "deep", "wide", "no_bias", "width_one", "flatten",
    "ce_sum", "mse_mean", "mse_sum", "callable_loss", "fallback", "interacting",
]
