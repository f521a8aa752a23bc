"""tallskinny-residual: residual units ``shortcut(z) + inner(z)`` as one analytic tallskinny block.

``Residual(inner, shortcut=None)`` is an ``nn.Module``; installing this package makes
tallskinny find its block (:class:`~tallskinny_residual.block.ResidualBlock`, composed
from the inner modules' own blocks) through the ``tallskinny.blocks`` entry-point group.
"""

from __future__ import annotations

from .module import Residual

__version__ = "0.1.0.dev0"

__all__ = ["Residual", "register_blocks", "__version__"]


def register_blocks() -> None:
    """Register :class:`Residual`'s block (idempotent)."""
    global _registered
    if _registered:
        return
    from tallskinny.blocks import register

    from .block import ResidualBlock

    register(Residual)(ResidualBlock)
    _registered = True


_registered = False
