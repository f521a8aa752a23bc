"""Fixtures for the block tests (float64 unless a test says otherwise)."""

from __future__ import annotations

import pytest

from tallskinny.blocks import registry


@pytest.fixture
def fresh_registry(monkeypatch):
    """A private copy of the registry (built-ins included, plugins considered loaded)."""
    monkeypatch.setattr(registry, "_adapters", dict(registry._adapters))
    monkeypatch.setattr(registry, "_plugins_loaded", True)
    return registry
