"""tallskinny-conv: analytic tallskinny blocks for convolutions and pooling.

Installing this package is enough: tallskinny loads it through the ``tallskinny.blocks``
entry-point group (``register_blocks`` below) on its first registry lookup, and then
``nn.Conv1d``, ``nn.Conv2d``, ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d`` and
``nn.MaxPool1d/2d`` get analytic blocks instead of the ``torch.func`` fallback.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

__all__ = ["register_blocks", "__version__"]


def register_blocks() -> None:
    """Register the blocks (idempotent: the modules register on their first import)."""
    from . import conv, pool  # noqa: F401
