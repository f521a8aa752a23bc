"""The code in README.md and docs/chain.md runs, and the examples' printed claims hold."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def _run_blocks(path: Path) -> dict:
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    previous = torch.get_default_dtype()
    try:
        for code in python_blocks(path):
            exec(compile(code, str(path), "exec"), namespace)
    finally:
        torch.set_default_dtype(previous)
    return namespace


def test_readme_examples_run_and_are_exact():
    ns = _run_blocks(ROOT / "README.md")
    x, x_dense = ns["x"], ns["x_dense"]
    assert ((x - x_dense).norm() / x_dense.norm()).item() < 1e-10
    torch.testing.assert_close(ns["x2"], 2 * ns["x1"], rtol=1e-10, atol=1e-12)
    assert sum(ns["fact"].inertia()) == len(ns["b"])


def test_chain_doc_example_runs():
    ns = _run_blocks(ROOT / "docs" / "chain.md")
    assert ns["x"].shape == ns["g"].shape


def test_minimal_example_prints_its_error(capsys):
    previous = torch.get_default_dtype()
    try:
        runpy.run_path(str(ROOT / "examples" / "minimal.py"), run_name="__main__")
    finally:
        torch.set_default_dtype(previous)
    out = capsys.readouterr().out
    error = float(re.search(r"relative error vs dense solve: ([0-9.e+-]+)", out).group(1))
    assert error < 1e-10
