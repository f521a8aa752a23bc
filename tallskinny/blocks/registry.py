"""The registry: which block adapter turns which ``nn.Module`` type into a block.

An *adapter* is a callable ``adapter(module) -> block`` (usually a :class:`Block`
subclass). :func:`register` records one for a module type; :func:`lookup` finds it
through the type's MRO. Plugins register theirs through the entry-point group
``tallskinny.blocks``: each entry point is loaded on the first lookup (once) and,
if its object is callable, called with no arguments.

A rule registered for a class also serves its subclasses. It is not used for a module
that computes something else than the class it was registered for — a subclass or
instance that redefines ``forward``, a module with forward hooks or parametrizations:
:func:`block_for` gives such a module the ``torch.func`` fallback (which calls the
module, hooks included), or with ``strict=True`` an :class:`UnsupportedModuleError`.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any, Callable, TypeVar

from torch import nn
from torch.nn.utils import parametrize

from .checks import describe
from .base import FuncBlock
from .func import FuncLoss
from .protocol import DifferentiableBlock, LossBlock

__all__ = [
    "ENTRY_POINT_GROUP",
    "UnsupportedModuleError",
    "block_for",
    "load_plugins",
    "lookup",
    "loss_for",
    "register",
    "registered_types",
]

ENTRY_POINT_GROUP = "tallskinny.blocks"

Adapter = Callable[[nn.Module], Any]
_A = TypeVar("_A", bound=Callable)

_adapters: dict[type, Adapter] = {}
_plugins_loaded = False


class UnsupportedModuleError(TypeError):
    """A module has no registered block rule and the caller asked for ``strict=True``."""


def register(module_type: type, *, override: bool = False) -> Callable[[_A], _A]:
    """Decorator: register ``adapter(module) -> block`` for ``module_type`` (and its subclasses).

    Registering a type that already has an adapter raises ``ValueError`` unless
    ``override=True``. The adapter is returned unchanged.
    """
    if not isinstance(module_type, type):
        raise TypeError(f"register() needs a class (a module type), got {describe(module_type)}")

    def decorator(adapter: _A) -> _A:
        if not callable(adapter):
            raise TypeError(f"a block adapter must be callable adapter(module) -> block, got {describe(adapter)}")
        existing = _adapters.get(module_type)
        if existing is not None and not override:
            raise ValueError(
                f"{_qualname(module_type)} already has the block adapter {_qualname(existing)}; "
                "pass override=True to register(...) to replace it"
            )
        _adapters[module_type] = adapter
        return adapter

    return decorator


def lookup(module_type: type) -> Adapter | None:
    """The adapter registered for ``module_type`` or its nearest base class in the MRO, else ``None``."""
    found = _lookup_with_owner(module_type)
    return None if found is None else found[1]


def registered_types() -> list[type]:
    """The module types that have an adapter (plugins included)."""
    load_plugins()
    return list(_adapters)


def load_plugins() -> None:
    """Load the entry points of the group ``tallskinny.blocks`` (once; later calls do nothing).

    A plugin that fails to load or to register gives a ``RuntimeWarning`` naming it.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # set first: a plugin may itself call lookup()
    try:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as err:  # a broken installation must not break the library
        warnings.warn(
            f"tallskinny: could not list the {ENTRY_POINT_GROUP!r} entry points: {err}", RuntimeWarning, stacklevel=2
        )
        return
    for ep in entry_points:
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as err:
            warnings.warn(
                f"tallskinny: the block plugin {ep.name!r} ({ep.value}) failed to load and is "
                f"ignored: {type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )


def block_for(module: Any, *, strict: bool = False) -> DifferentiableBlock:
    """The block for ``module``.

    An ``nn.Module`` gets its registered adapter (through the MRO; not for a module that
    redefines ``forward`` or has forward hooks or parametrizations, see the module
    docstring), else a :class:`FuncBlock` — or, with ``strict=True``, an
    :class:`UnsupportedModuleError`. An object that already implements
    :class:`DifferentiableBlock` (and is not an ``nn.Module``) is returned as is.
    """
    if isinstance(module, nn.Module):
        adapter = _adapter_for(module)
        if adapter is None:
            if strict:
                raise UnsupportedModuleError(_unsupported_message(module, "block"))
            return FuncBlock(module)
        block = adapter(module)
        if not isinstance(block, DifferentiableBlock):
            kind = "a loss block" if isinstance(block, LossBlock) else describe(block)
            raise TypeError(
                f"the adapter {_qualname(adapter)} registered for {_qualname(type(module))} returned "
                f"{kind}, not a DifferentiableBlock (parameters, forward, oracle)"
                + ("; use loss_for() for losses" if isinstance(block, LossBlock) else "")
            )
        return block
    if isinstance(module, DifferentiableBlock):
        return module
    raise TypeError(
        f"block_for needs an nn.Module or an object implementing DifferentiableBlock "
        f"(parameters, forward, oracle), got {describe(module)}"
    )


def loss_for(loss: Any, *, strict: bool = False) -> LossBlock:
    """The loss block for ``loss``.

    A registered loss module gets its analytic block; an object that implements
    :class:`LossBlock` (and is not an ``nn.Module``) is returned as is; any other
    callable ``loss(z, target) -> scalar`` becomes a :class:`FuncLoss`. With
    ``strict=True`` an unregistered ``nn.Module`` raises :class:`UnsupportedModuleError`.
    """
    if isinstance(loss, nn.Module):
        adapter = _adapter_for(loss)
        if adapter is None:
            if strict:
                raise UnsupportedModuleError(_unsupported_message(loss, "loss"))
            return FuncLoss(loss)
        block = adapter(loss)
        if not isinstance(block, LossBlock):
            raise TypeError(
                f"the adapter {_qualname(adapter)} registered for {_qualname(type(loss))} returned "
                f"{describe(block)}, not a LossBlock (forward, oracle, check_target)"
            )
        return block
    if isinstance(loss, LossBlock):
        return loss
    if callable(loss):
        return FuncLoss(loss)
    raise TypeError(f"loss_for needs a callable loss(z, target) -> scalar or a LossBlock, got {describe(loss)}")


# ---------------------------------------------------------------------------------------
def _lookup_with_owner(module_type: type) -> tuple[type, Adapter] | None:
    if not isinstance(module_type, type):
        raise TypeError(f"lookup() needs a class (a module type), got {describe(module_type)}")
    load_plugins()
    for cls in module_type.__mro__:
        adapter = _adapters.get(cls)
        if adapter is not None:
            return cls, adapter
    return None


def _adapter_for(module: nn.Module) -> Adapter | None:
    """The registered adapter for this instance, or ``None`` where it would not compute the module."""
    found = _lookup_with_owner(type(module))
    if found is None:
        return None
    owner, adapter = found
    return adapter if _departure(module, owner) is None else None


def _departure(module: nn.Module, owner: type) -> str | None:
    """Why ``module`` computes something else than the class ``owner`` its rule was registered for.

    A subclass (or the instance) that redefines ``forward``, forward hooks (they may change
    the input or the output) and parametrizations (they change the parameter names and
    values) all make an analytic rule for ``owner`` wrong; ``None`` if there is none.
    """
    cls = type(module)
    if "forward" in vars(module):
        return "the instance has its own forward()"
    if getattr(cls, "forward", None) is not getattr(owner, "forward", None):
        return f"{_qualname(cls)} overrides forward() of {_qualname(owner)}"
    if module._forward_hooks or module._forward_pre_hooks:
        return "the module has forward hooks"
    if parametrize.is_parametrized(module):
        return "the module has parametrizations"
    return None


def _unsupported_message(module: nn.Module, kind: str) -> str:
    cls = type(module)
    found = _lookup_with_owner(cls)
    reason = (
        f"the block rule registered for {_qualname(found[0])} does not apply to this "
        f"{_qualname(cls)}: {_departure(module, found[0])}"
        if found is not None
        else f"no block rule is registered for {_qualname(cls)}"
    )
    return (
        f"{reason} (strict=True forbids the torch.func fallback for this {kind}). Register one with "
        f"@tallskinny.blocks.register({cls.__name__}) on a Block subclass (or adapter(module) -> block), "
        f"publish it through the {ENTRY_POINT_GROUP!r} entry-point group, or pass strict=False "
        "to use the generic torch.func fallback"
    )


def _qualname(obj) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{module}.{name}" if module and module != "builtins" else name
