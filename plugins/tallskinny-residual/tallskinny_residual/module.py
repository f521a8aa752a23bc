"""The ``Residual`` module: ``z ↦ shortcut(z) + inner(z)``."""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``shortcut(z) + inner(z)`` with ``inner`` a sequence of modules applied in order.

    ``inner`` is one module, an ``nn.Sequential``/``nn.ModuleList`` or an iterable of
    modules (stored as the ``nn.Sequential`` ``self.inner``); ``shortcut`` defaults to the identity
    (``nn.Identity``), a projection such as ``nn.Linear`` is allowed. The parameters are
    those of ``inner`` followed by those of ``shortcut`` (``named_parameters()`` order).
    """

    def __init__(self, inner: nn.Module | Iterable[nn.Module], shortcut: nn.Module | None = None):
        super().__init__()
        if isinstance(inner, (nn.Sequential, nn.ModuleList)):
            modules = list(inner)
        elif isinstance(inner, nn.Module):
            modules = [inner]
        else:
            try:
                modules = list(inner)
            except TypeError:
                raise TypeError(f"Residual: inner must be a module or a sequence of modules, got {type(inner).__name__}") from None
        if not modules:
            raise ValueError("Residual: inner must contain at least one module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"Residual: inner[{i}] must be an nn.Module, got {type(m).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"Residual: shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        self.inner = nn.Sequential(*modules)
        self.shortcut = nn.Identity() if shortcut is None else shortcut

    def forward(self, z: Tensor) -> Tensor:
        return self.shortcut(z) + self.inner(z)
