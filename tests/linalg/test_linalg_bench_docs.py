"""``bench/linalg.py`` and the examples of ``docs/linalg.md`` must not rot (seconds)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    saved = dict(os.environ)
    spec = importlib.util.spec_from_file_location("bench_linalg", ROOT / "bench" / "linalg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.environ.clear()
    os.environ.update(saved)  # the benchmark pins BLAS threads through the environment
    return module


def test_banded_storage_matches_the_dense_matrix(bench):
    from tallskinny.linalg.testing import random_block_tridiagonal, to_banded

    op = random_block_tridiagonal([3, 1, 4, 2], torch.Generator().manual_seed(0))
    w = 2 * 4 - 1
    expected = to_banded(op.to_dense(), w, w).numpy()
    assert (bench.banded_storage(op, w) == expected).all()


def test_benchmark_rows_on_small_problems(bench):
    for symmetric in (False, True):
        row = bench.bench_row(6, 3, symmetric, repeats=1, dense=True)
        assert row["N"] == 18 and row["rel_diff"] < 1e-12
        for key in ("solve", "factor+solve", "solve_banded", "gbtrs", "dense"):
            assert 0 < row[key] < 10, key
        assert ("delayed" in row) == symmetric


def test_benchmark_command_end_to_end(bench, capsys):
    threads = torch.get_num_threads()
    rows = bench.main(["--blocks", "4", "--sizes", "2", "--repeats", "1"])
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    assert "torch.set_num_threads(1): torch uses 1 thread" in out
    assert [r["kind"] for r in rows] == ["LU", "LDLᵀ"]
    assert re.search(r"^\s+4\s+2\s+8\s+LU \|", out, flags=re.M)
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


def test_docs_examples_run():
    text = (ROOT / "docs" / "linalg.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/linalg.md", "exec"), namespace)
    K, damped, f = namespace["K"], namespace["damped"], namespace["f"]
    assert type(damped).__name__ == "SymmetricBlockTridiagonal"
    M = K.to_dense()
    x1 = namespace["x1"]
    assert torch.allclose(M @ x1, torch.ones(10, dtype=torch.float64), atol=1e-10)
    ev = torch.linalg.eigvalsh(M)
    assert tuple(f.inertia()) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
