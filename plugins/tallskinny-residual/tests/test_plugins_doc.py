"""The examples of docs/plugins.md run (with both plugins installed) and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tallskinny.blocks import registry

DOC = Path(__file__).resolve().parents[3] / "docs" / "plugins.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_plugins_doc_examples_run(monkeypatch):
    pytest.importorskip("tallskinny_conv")
    registry.load_plugins()
    # the example registers a rule for its own module: keep it out of the global registry
    monkeypatch.setattr(registry, "_adapters", dict(registry._adapters))
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 6
    namespace: dict = {"__name__": "docs_plugins"}
    previous = torch.get_default_dtype()
    try:
        for code in blocks:
            exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        torch.set_default_dtype(previous)
    assert registry.lookup(namespace["Scale"]) is namespace["ScaleBlock"]
    # the analytic rule gave the fallback's solve (asserted in the doc), on a non-trivial vector
    assert namespace["x_fallback"].norm() > 0 and namespace["x"].shape == namespace["b"].shape

