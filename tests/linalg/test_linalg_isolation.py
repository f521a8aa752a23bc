"""``tallskinny.linalg`` is standalone: it imports neither ``torch.nn`` nor the rest of ``tallskinny``."""

from __future__ import annotations

import ast
from pathlib import Path

import tallskinny.linalg

PACKAGE = Path(tallskinny.linalg.__file__).parent


def forbidden_imports(source: str) -> list[str]:
    """Every import in ``source`` that leaves ``tallskinny.linalg`` or touches ``torch.nn``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2:  # from .. import x: a sibling of linalg
                bad.append(f"line {node.lineno}: relative import leaving linalg (level {node.level})")
                continue
            if node.level == 1:  # from .x import y: inside linalg
                continue
            modules = [node.module or ""]
            if node.module == "torch":
                modules += [f"torch.{alias.name}" for alias in node.names]
        else:
            continue
        for m in modules:
            if m == "torch.nn" or m.startswith("torch.nn.") or m == "tallskinny" or m.startswith("tallskinny."):
                bad.append(f"line {node.lineno}: {m}")
    return bad


def test_the_checker_catches_bad_imports():
    assert forbidden_imports("import torch.nn as nn") == ["line 1: torch.nn"]
    assert forbidden_imports("from torch import nn") == ["line 1: torch.nn"]
    assert forbidden_imports("from torch.nn import functional") == ["line 1: torch.nn"]
    assert forbidden_imports("import tallskinny.blocks") == ["line 1: tallskinny.blocks"]
    assert forbidden_imports("from tallskinny import Chain") == ["line 1: tallskinny"]
    assert len(forbidden_imports("def f():\n    from ..blocks import protocol")) == 1
    assert forbidden_imports("import torch\nfrom torch import Tensor\nfrom .operators import Dense") == []


def test_linalg_modules_import_only_torch_and_each_other():
    files = sorted(PACKAGE.glob("*.py"))
    assert {"operators.py", "block.py", "factor.py", "testing.py", "__init__.py"} <= {f.name for f in files}
    problems = {f.name: forbidden_imports(f.read_text()) for f in files}
    assert not any(problems.values()), problems
