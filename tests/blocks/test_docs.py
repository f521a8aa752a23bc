"""The examples in docs/blocks.md run and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "blocks.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_blocks_doc_examples_run(fresh_registry):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 3
    namespace: dict = {"__name__": "docs_blocks"}
    torch.manual_seed(0)
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), namespace)
    # the examples registered their blocks (in the test's private registry only)
    assert fresh_registry.lookup(namespace["ScaledTanh"]) is namespace["ScaledTanhBlock"]
    assert fresh_registry.lookup(namespace["Centered"]) is namespace["CenteredBlock"]


def test_doc_example_analytic_block_is_really_checked(fresh_registry):
    """Break one entry of the doc's analytic oracle: check_block must notice."""
    code = "\n".join(python_blocks(DOC.read_text(encoding="utf-8"))[:2])
    broken = code.replace("C_a = (g * t1 * w)", "C_a = (g * t1 * w * 1.0000001)")
    assert broken != code
    namespace: dict = {"__name__": "docs_blocks_broken"}
    try:
        exec(compile(broken, str(DOC), "exec"), namespace)
    except AssertionError as err:
        assert ".C" in str(err)
    else:
        raise AssertionError("check_block accepted a wrong C")
