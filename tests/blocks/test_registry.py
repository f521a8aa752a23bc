"""Registry semantics: decorator, duplicates, override, MRO, strict mode, entry-point plugins."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import tallskinny.blocks as blocks
from tallskinny.blocks import (
    Block,
    DifferentiableBlock,
    FuncBlock,
    FuncLoss,
    LossBlock,
    UnsupportedModuleError,
    block_for,
    lookup,
    loss_for,
    register,
)
from tallskinny.blocks.elementwise import TanhBlock
from tallskinny.blocks.linear import LinearBlock
from tallskinny.blocks.losses import CrossEntropyLossBlock, MSELossBlock


class Scale(nn.Module):
    def forward(self, x):
        return 3 * x


class ScaleBlock(Block):
    """A (fallback) block registered for Scale."""


def test_builtins_are_registered_on_import():
    expected = {
        nn.Linear: LinearBlock,
        nn.Tanh: TanhBlock,
        nn.CrossEntropyLoss: CrossEntropyLossBlock,
        nn.MSELoss: MSELossBlock,
    }
    for module_type, adapter in expected.items():
        assert lookup(module_type) is adapter
    for name in ("ReLU", "GELU", "Sigmoid", "Softplus", "SiLU", "Identity", "Flatten", "Unflatten"):
        assert lookup(getattr(nn, name)) is not None, name
    assert set(blocks.__all__) >= {
        "Oracle", "DifferentiableBlock", "LossBlock", "Block", "FuncBlock", "FuncLoss",
        "register", "lookup", "block_for", "loss_for", "UnsupportedModuleError",
    }  # fmt: skip


def test_register_decorator_and_lookup(fresh_registry):
    assert lookup(Scale) is None
    returned = register(Scale)(ScaleBlock)
    assert returned is ScaleBlock and lookup(Scale) is ScaleBlock
    block = block_for(Scale())
    assert type(block) is ScaleBlock and isinstance(block, DifferentiableBlock)
    assert Scale in fresh_registry.registered_types() and nn.Linear in fresh_registry.registered_types()


def test_double_registration_raises_unless_override(fresh_registry):
    register(Scale)(ScaleBlock)

    class Other(Block):
        pass

    with pytest.raises(ValueError, match=r"Scale already has the block adapter .*ScaleBlock.*override=True"):
        register(Scale)(Other)
    assert lookup(Scale) is ScaleBlock
    register(Scale, override=True)(Other)
    assert lookup(Scale) is Other
    with pytest.raises(ValueError, match="already has"):
        register(nn.Linear)(Other)


def test_register_validates_its_arguments(fresh_registry):
    with pytest.raises(TypeError, match="needs a class"):
        register(Scale())
    with pytest.raises(TypeError, match="must be callable"):
        register(Scale)(42)
    with pytest.raises(TypeError, match="needs a class"):
        lookup(Scale())


def test_factory_adapters(fresh_registry):
    made = []

    @register(Scale)
    def make(module):
        made.append(module)
        return FuncBlock(module)

    m = Scale()
    assert isinstance(block_for(m), FuncBlock) and made == [m]


def test_mro_lookup(fresh_registry):
    register(Scale)(ScaleBlock)

    class Child(Scale):
        pass

    class GrandChild(Child):
        pass

    assert lookup(GrandChild) is ScaleBlock
    assert type(block_for(GrandChild())) is ScaleBlock

    class ChildBlock(Block):
        pass

    register(Child)(ChildBlock)
    assert lookup(GrandChild) is ChildBlock  # the nearest class in the MRO wins
    assert lookup(Scale) is ScaleBlock


def test_subclass_that_changes_forward_gets_the_fallback():
    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    class Plain(nn.Linear):
        pass

    assert lookup(Shifted) is LinearBlock  # lookup is the plain MRO search …
    assert type(block_for(Shifted(2, 2))) is FuncBlock  # … but the rule does not apply
    assert type(block_for(Plain(2, 2))) is LinearBlock
    with pytest.raises(UnsupportedModuleError, match="Shifted overrides forward"):
        block_for(Shifted(2, 2), strict=True)


def test_modules_with_hooks_or_parametrizations_get_the_fallback():
    hooked = nn.Linear(2, 2).double()
    hooked.register_forward_hook(lambda m, i, o: 2 * o)
    block = block_for(hooked)
    assert type(block) is FuncBlock
    z = torch.ones(1, 2, dtype=torch.float64)
    assert torch.allclose(block.forward(z, list(block.parameters())), hooked(z))
    with pytest.raises(UnsupportedModuleError, match="forward hooks"):
        block_for(hooked, strict=True)

    class Symmetric(nn.Module):
        def forward(self, X):
            return X.triu() + X.triu(1).mT

    param = parametrize.register_parametrization(nn.Linear(3, 3).double(), "weight", Symmetric())
    assert type(block_for(param)) is FuncBlock
    with pytest.raises(UnsupportedModuleError, match="parametrizations"):
        block_for(param, strict=True)

    instance = nn.Tanh()
    instance.forward = lambda x: x
    assert type(block_for(instance)) is FuncBlock


def test_strict_mode_error_message():
    with pytest.raises(UnsupportedModuleError) as info:
        block_for(Scale(), strict=True)
    message = str(info.value)
    assert "no block rule is registered for" in message and "Scale" in message
    assert "@tallskinny.blocks.register(Scale)" in message and "tallskinny.blocks" in message
    assert isinstance(info.value, TypeError)
    assert type(block_for(Scale())) is FuncBlock
    with pytest.raises(UnsupportedModuleError, match="L1Loss"):
        loss_for(nn.L1Loss(), strict=True)


def test_objects_that_are_blocks_pass_through():
    class Custom:
        def parameters(self):
            return []

        def forward(self, z, params):
            return z

        def oracle(self, z, params, g, *, second_order=True):
            raise NotImplementedError

    custom = Custom()
    assert block_for(custom) is custom
    assert block_for(custom, strict=True) is custom
    loss = FuncLoss(lambda z, t: (z - t).pow(2).sum())
    assert loss_for(loss) is loss and isinstance(loss, LossBlock)
    with pytest.raises(TypeError, match="nn.Module or an object implementing DifferentiableBlock"):
        block_for(lambda x: x)
    with pytest.raises(TypeError, match="callable loss"):
        loss_for(3)


def test_loss_for():
    assert isinstance(loss_for(nn.CrossEntropyLoss()), CrossEntropyLossBlock)
    assert isinstance(loss_for(nn.MSELoss(reduction="sum")), MSELossBlock)
    fn = lambda z, t: (z * t).sum()  # noqa: E731
    assert isinstance(loss_for(fn), FuncLoss) and loss_for(fn).loss is fn
    assert isinstance(loss_for(nn.L1Loss()), FuncLoss)
    assert isinstance(loss_for(nn.functional.mse_loss), FuncLoss)


def test_adapter_returning_the_wrong_kind(fresh_registry):
    register(Scale)(lambda module: FuncLoss(module))
    with pytest.raises(TypeError, match="returned a loss block, not a DifferentiableBlock.*loss_for"):
        block_for(Scale())
    with pytest.raises(TypeError, match="not a LossBlock"):
        loss_for(nn.Linear(2, 2))


# -- entry points ---------------------------------------------------------------------------
class FakeEntryPoint:
    def __init__(self, name, target, *, fail=None):
        self.name, self.value, self._target, self._fail = name, f"fake_plugin:{name}", target, fail
        self.loads = 0

    def load(self):
        self.loads += 1
        if self._fail is not None:
            raise self._fail
        return self._target


@pytest.fixture
def plugins(monkeypatch, fresh_registry):
    """Install fake entry points; the registry will load them on the next lookup."""
    calls = []

    def install(*entry_points):
        def fake_entry_points(**kwargs):
            calls.append(kwargs)
            return list(entry_points) if kwargs.get("group") == "tallskinny.blocks" else []

        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
        monkeypatch.setattr(fresh_registry, "_plugins_loaded", False)
        return calls

    return install


def test_entry_points_load_lazily_once(plugins):
    registered = []

    def register_scale():
        registered.append(1)
        register(Scale)(ScaleBlock)

    good = FakeEntryPoint("scale", register_scale)
    not_callable = FakeEntryPoint("constant", 42)  # loaded, not called
    calls = plugins(good, not_callable)
    assert calls == [] and registered == []  # nothing happens before the first lookup
    assert lookup(Scale) is ScaleBlock
    assert calls == [{"group": "tallskinny.blocks"}] and registered == [1]
    assert lookup(Scale) is ScaleBlock and type(block_for(Scale())) is ScaleBlock
    assert good.loads == 1 and not_callable.loads == 1 and len(calls) == 1 and registered == [1]


def test_failing_plugins_warn_and_the_rest_still_loads(plugins):
    def broken():
        raise RuntimeError("cannot register")

    def register_scale():
        register(Scale)(ScaleBlock)

    plugins(
        FakeEntryPoint("missing", None, fail=ImportError("no module named fake_plugin")),
        FakeEntryPoint("broken", broken),
        FakeEntryPoint("duplicate", lambda: register(nn.Linear)(ScaleBlock)),
        FakeEntryPoint("scale", register_scale),
    )
    with pytest.warns(RuntimeWarning) as record:
        assert lookup(Scale) is ScaleBlock
    messages = [str(w.message) for w in record]
    assert any("'missing'" in m and "ImportError" in m and "no module named fake_plugin" in m for m in messages)
    assert any("'broken'" in m and "cannot register" in m for m in messages)
    assert any("'duplicate'" in m and "already has" in m for m in messages)
    assert len(messages) == 3
    assert lookup(nn.Linear) is LinearBlock  # the duplicate did not replace the built-in


def test_block_for_loads_plugins_too(plugins):
    plugins(FakeEntryPoint("scale", lambda: register(Scale)(ScaleBlock)))
    assert type(block_for(Scale())) is ScaleBlock
