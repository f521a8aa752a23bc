"""Blocks: the derivatives of one module of a chain, contracted with the backprop adjoint.

A block maps ``z_in`` to ``z_out`` and provides its :class:`Oracle` ``(G, F, A, C, E)``
(see :mod:`tallskinny.blocks.protocol`). Registered modules get an analytic block
(``nn.Linear``, the common activations, ``nn.Flatten``/``nn.Unflatten``,
``nn.CrossEntropyLoss``, ``nn.MSELoss``); any other module gets the ``torch.func``
fallback (:class:`FuncBlock`), any other loss callable :class:`FuncLoss`. Importing
this package registers the built-in rules; plugins register theirs through the
``tallskinny.blocks`` entry-point group. :mod:`tallskinny.blocks.testing` checks a
block against the fallback.
"""

from .base import Block, FuncBlock
from .func import FuncLoss
from .protocol import DeferredOracle, DifferentiableBlock, LossBlock, Oracle, OracleMemory
from .registry import UnsupportedModuleError, block_for, lookup, loss_for, register

# the built-in rules register themselves on import
from . import elementwise, linear, losses, shape  # noqa: E402,F401  (isort: skip)
from . import norm  # noqa: E402,F401  (isort: skip)

__all__ = [
    "Block",
    "DeferredOracle",
    "DifferentiableBlock",
    "FuncBlock",
    "FuncLoss",
    "LossBlock",
    "Oracle",
    "OracleMemory",
    "UnsupportedModuleError",
    "block_for",
    "lookup",
    "loss_for",
    "register",
]
