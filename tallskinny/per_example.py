"""The chain as a function of a flat parameter vector: outputs, per-example gradients
and output Jacobians (autograd, for the influence and Laplace methods)."""

from __future__ import annotations

import torch
from torch import Tensor

from .chain import Chain


def flat_parameters(chain: Chain) -> Tensor:
    """``θ``: the chain's parameters, flattened and concatenated (a detached copy)."""
    return torch.cat([p.detach().reshape(-1) for p in chain.parameters()])


def output_at(chain: Chain, theta: Tensor, inputs: Tensor) -> Tensor:
    """The network output ``z_L`` at parameters ``theta`` (differentiable w.r.t. ``theta``)."""
    sizes = [sum(p.numel() for p in block.parameters()) for block in chain.blocks]
    z = inputs
    for block, flat in zip(chain.blocks, torch.split(theta, sizes)):
        shapes = [p.shape for p in block.parameters()]
        pieces = torch.split(flat, [p.numel() for p in block.parameters()])
        z = block.forward(z, [piece.view(shape) for piece, shape in zip(pieces, shapes)])
    return z


def loss_at(chain: Chain, theta: Tensor, inputs: Tensor, targets) -> Tensor:
    """The chain's loss at parameters ``theta``."""
    return chain.loss_block.forward(output_at(chain, theta, inputs), targets)


def per_example_gradients(chain: Chain, inputs: Tensor, targets: Tensor) -> Tensor:
    """``(n, P)``: row ``i`` is ``∇_θ loss(example i alone)``.

    One forward and one backward pass per example (a batch of one each): cost ``n``
    times that of one gradient. Examples are taken along the first dimension.
    """
    theta = flat_parameters(chain)
    rows = []
    with torch.enable_grad():
        for i in range(inputs.shape[0]):
            t = theta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_at(chain, t, inputs[i : i + 1], targets[i : i + 1]), t)
            rows.append(grad)
    return torch.stack(rows)


def output_jacobian(chain: Chain, inputs: Tensor) -> Tensor:
    """``(n, d, P)``: the Jacobian of each example's output (``d`` numbers) w.r.t. ``θ``
    (one backward pass per output entry; samples must not interact in the network)."""
    theta = flat_parameters(chain)
    with torch.enable_grad():
        t = theta.clone().requires_grad_(True)
        out = output_at(chain, t, inputs)
        flat = out.reshape(-1)
        rows = [torch.autograd.grad(flat[k], t, retain_graph=True)[0] for k in range(flat.numel())]
    return torch.stack(rows).reshape(inputs.shape[0], -1, theta.numel())
