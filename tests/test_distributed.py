"""Two gloo processes on CPU, each with its shard (unequal sizes): every rank gets the
single-process curvature of the concatenated data (every route, Hessian and GGN; HVPs,
solves, log|det|, inertia; Laplace evidence; influence), and the same errors."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tallskinny as ts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "distributed_worker.py"
TIMEOUT = 120  # seconds for both processes together: a hang fails the test, it never blocks CI


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, world: int, args: list[str], cwd: Path) -> list[str]:
    """Run ``script`` on ``world`` processes as ``torchrun --nproc_per_node=world`` would
    (the same environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``; without its agent, seconds faster); their outputs. Fails, never
    hangs, where a process fails or they take over :data:`TIMEOUT` seconds; every
    process is gone when it returns."""
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):  # loopback: no dependence on how the host name resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # the children import this checkout's tallskinny, as the parent does
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    procs = []
    try:
        for r in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, str(script), *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(cwd),
            ))
        deadline = time.monotonic() + TIMEOUT
        logs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{script.name}: the ranks did not finish within {TIMEOUT} s (a collective hung?)")
            logs.append(out.decode(errors="replace"))
        for r, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"{script.name}: rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return logs


def _run_ranks(tmp_path: Path, world: int = 2) -> list[dict]:
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    # each rank saves to the path of its RANK: give every process the list, it picks its own
    _launch(WORKER, world, [str(tmp_path / "rank{rank}.pt")], tmp_path)
    return [torch.load(o, weights_only=False) for o in outs]


def _assert_same(a, b, where: str, tol: float | None) -> None:
    """``a == b`` bitwise (``tol=None``) or to ``tol`` relative to ``max(1, |b|)``."""
    if isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in b:
            _assert_same(a[k], b[k], f"{where}[{k!r}]", tol)
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", tol)
    elif isinstance(b, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if tol is None:
            assert torch.equal(a, b), f"{where}: ranks differ by {float((a - b).abs().max()):.3g}"
        else:
            err = float((a - b).abs().max()) / max(1.0, float(b.abs().max())) if b.numel() else 0.0
            assert err <= tol, f"{where}: {err:.3g} from the single-process result"
    elif isinstance(b, float) and tol is not None:
        assert abs(a - b) <= tol * max(1.0, abs(b)), f"{where}: {a} against {b}"
    else:
        assert a == b, f"{where}: {a!r} against {b!r}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_ranks(tmp_path_factory.mktemp("distributed"))


def test_every_rank_gets_the_single_process_result(ranks):
    w = _worker_module()
    X, y, Xt, yt = w.data()
    # one process, the concatenated samples in rank order, no torch.distributed
    reference = w.compute(w.batches(X, y, 7), [(Xt, yt)])
    for r, got in enumerate(ranks):
        got = {k: v for k, v in got.items() if k != "errors"}
        _assert_same(got, reference, f"rank {r}", 1e-12)
    # and the ranks agree bitwise
    _assert_same(
        {k: v for k, v in ranks[1].items() if k != "errors"},
        {k: v for k, v in ranks[0].items() if k != "errors"}, "rank 1 vs rank 0", None,
    )
    # the routes were taken as asked (the auto choice is the same everywhere)
    for kind, methods in w.ROUTES.items():
        for method in methods:
            if method != "auto":
                assert ranks[0][kind, method]["method"] == method


def test_disagreeing_shards_raise_on_every_rank(ranks):
    errs = [r["errors"] for r in ranks]
    for case in ("shapes", "dtypes", "parameters"):
        assert [e[case] for e in errs] == ["ShardMismatchError"] * 2, case
    # the rank whose loader failed raises its own error; the other names it
    assert [e["broken"] for e in errs] == ["ShardMismatchError", "TypeError"]


def test_an_empty_shard_is_no_sample(ranks):
    w = _worker_module()
    X, y, _, _ = w.data()
    expected = w.model().curvature(X[:5], y[:5], kind="ggn", method="kernel").factorize(w.DAMPING).logdet()
    for r in ranks:
        _assert_same(r["errors"]["empty"], expected, "empty shard", 1e-12)


def test_without_torch_distributed():
    w = _worker_module()
    X, y, _, _ = w.data()
    chain = w.model()
    with pytest.raises(RuntimeError, match="distributed=True needs torch.distributed initialized"):
        chain.curvature([(X, y)], kind="ggn", distributed=True)
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        chain.curvature([(X, y)], kind="ggn", distributed="yes")
    # not initialized: a loader is this process's data (the default), as with distributed=False
    v = torch.ones(sum(p.numel() for p in chain.parameters()), dtype=torch.float64)
    loader = [(X[:3], y[:3]), (X[3:], y[3:])]
    whole = chain.curvature(X, y, kind="ggn").hvp(v)
    for distributed in (None, False):
        assert torch.equal(chain.curvature(loader, kind="ggn", distributed=distributed).hvp(v), whole)
    assert issubclass(ts.ShardMismatchError, ValueError)


def test_the_doc_example_runs_on_two_processes(tmp_path):
    """The script of docs/distributed.md on two ranks prints, on both, the numbers of one
    process holding all the samples (in another order: to rounding)."""
    import re

    text = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    script = tmp_path / "script.py"
    script.write_text(re.findall(r"```python\n(.*?)```", text, flags=re.S)[0], encoding="utf-8")
    pattern = re.compile(r"rank (\d+): route (\w+) logdet (\S+) evidence (\S+)")

    def printed(world: int) -> dict:
        found = [pattern.search(log) for log in _launch(script, world, [], tmp_path)]
        assert all(found), "the example printed no result line"
        return {int(m.group(1)): (m.group(2), float(m.group(3)), float(m.group(4))) for m in found}

    two, one = printed(2), printed(1)
    assert two[0] == two[1]  # bitwise: the same printed repr
    route, logdet, evidence = two[0]
    assert route == one[0][0]
    assert abs(logdet - one[0][1]) <= 1e-12 * abs(one[0][1])
    assert abs(evidence - one[0][2]) <= 1e-12 * abs(one[0][2])
