"""Memory: the plan's estimate is made from shapes and a call that would not fit is refused
with ``ts.ResourceError`` before any work (issue #14, "Resources")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import elimination, resources
from tallskinny.testing import elimination_forbidden
from tallskinny.blocks.func import func_oracle_bytes
from tallskinny.blocks.linear import LinearBlock

GB = 1e9


def mlp(widths, act=nn.Tanh):
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), act()]
    return layers + [nn.Linear(widths[-2], widths[-1])]


def data(B, n, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, generator=gen), torch.randint(0, classes, (B,), generator=gen)


@pytest.fixture
def no_elimination():
    """Reaching the elimination (its preparation or the factorization) fails the test."""
    with elimination_forbidden():
        yield


# -- the cases of the issue ------------------------------------------------------------------
def test_wide_linear_at_batch_64_is_refused_before_the_elimination(no_elimination):
    """Linear(2000, 2000) at batch 64: the value Hessian alone is 128 000² (131 GB); the
    factorization used to die in the allocator after seconds of work."""
    torch.manual_seed(0)
    chain = ts.Chain(mlp([2000, 2000, 10]), nn.CrossEntropyLoss())
    X, y = data(64, 2000)
    curv = chain.curvature(X, y, memory_limit=16 * GB)  # the curvature pass itself fits
    with pytest.raises(ts.ResourceError) as info:
        curv.factorize(1e-3)
    err = info.value
    assert isinstance(err, MemoryError)
    assert err.estimate > 131 * GB and err.limit == 16 * GB  # more than the value Hessian alone
    message = str(err)
    assert resources.format_bytes(err.estimate) in message and "16.0 GB" in message and "memory_limit" in message
    assert "block 0 (Linear)" in err.largest and "128 000" in err.largest
    assert "a batch of at most" in message and "kind='ggn' needs" in message
    # inverse_hvp hands its limit on to the factorization: refused the same way
    with pytest.raises(ts.ResourceError):
        chain.inverse_hvp(X, y, torch.zeros(curv.num_parameters), 1e-3, memory_limit=16 * GB)


def test_the_suggested_batch_fits_and_one_more_does_not():
    torch.manual_seed(0)
    chain = ts.Chain(mlp([2000, 2000, 10]), nn.CrossEntropyLoss())
    X, y = data(64, 2000)
    limit = 16 * GB
    with pytest.raises(ts.ResourceError) as info:
        chain.curvature(X, y, memory_limit=limit).factorize(1e-3)
    b = int(str(info.value).split("a batch of at most ")[1].split()[0])
    assert 1 <= b < 64
    assert chain.curvature(X[:b], y[:b]).factorization_memory(1e-3).total <= limit
    assert chain.curvature(X[: b + 1], y[: b + 1]).factorization_memory(1e-3).total > limit


def test_to_dense_of_four_million_parameters_is_refused_with_the_default_limit(monkeypatch):
    """4 M parameters: P² alone is 129 TB, more than any machine has available."""
    torch.manual_seed(0)
    chain = ts.Chain(mlp([2000, 2000, 10]), nn.CrossEntropyLoss())
    curv = chain.curvature(*data(1, 2000))
    assert curv.num_parameters > 4_000_000

    def reached(*args, **kwargs):
        raise AssertionError("the HVP was reached: to_dense was not refused before the work")

    monkeypatch.setattr(elimination, "hvp", reached)
    with pytest.raises(ts.ResourceError) as info:
        curv.to_dense()
    err = info.value
    assert err.estimate >= 3 * curv.num_parameters**2 * 8 and 0 < err.limit < err.estimate
    assert "available memory" in str(err) and "TB" in str(err) and "parameters fit" in str(err)


def test_a_huge_fallback_block_is_refused_before_its_oracle(monkeypatch):
    """The torch.func fallback forms (p + a_in)² for its Hessian: known from the shapes."""

    class Wide(nn.Module):  # unregistered: the fallback
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(300, 300) / 300)

        def forward(self, x):
            return torch.tanh(x @ self.W)

    def reached(*args, **kwargs):
        raise AssertionError("the fallback's oracle was reached")

    import tallskinny.blocks.func as func

    monkeypatch.setattr(func, "func_oracle", reached)
    chain = ts.Chain([Wide(), nn.Linear(300, 10)], nn.CrossEntropyLoss())
    X, y = data(4, 300)
    with pytest.raises(ts.ResourceError) as info:
        chain.curvature(X, y, memory_limit=1 * GB)
    n = 300 * 300 + 4 * 300
    assert info.value.estimate >= func_oracle_bytes(4 * 300, 4 * 300, 300 * 300, second_order=True, itemsize=8)[0]
    assert info.value.estimate >= n * n * 8
    assert "block 0 (Wide): its oracle" in str(info.value)
    # its Gauss–Newton oracle has no Hessian: named as what would fit
    assert "kind='ggn' needs" in str(info.value)


# -- the limit -------------------------------------------------------------------------------
def test_a_small_limit_refuses_a_small_model_and_a_generous_one_passes():
    torch.manual_seed(0)
    chain = ts.Chain(mlp([8, 16, 16, 4]), nn.CrossEntropyLoss())
    X, y = data(4, 8, classes=4)
    with pytest.raises(ts.ResourceError) as info:
        chain.curvature(X, y, memory_limit=1000)
    assert info.value.limit == 1000 and "1.0 kB" in str(info.value) and "memory_limit" in str(info.value)
    v = torch.randn(sum(p.numel() for p in chain.parameters()))
    for limit in (None, 1e12, float("inf")):
        curv = chain.curvature(X, y, memory_limit=limit)
        torch.testing.assert_close(curv.hvp(v), chain.curvature(X, y).hvp(v), rtol=0, atol=0)
        curv.factorize(1e-3)
        curv.to_dense()
    with pytest.raises(ts.ResourceError):
        chain.hvp(X, y, v, memory_limit=1000)
    with pytest.raises(ts.ResourceError):
        chain.inverse_hvp(X, y, v, 1e-2, memory_limit=1000)


def test_the_curvature_keeps_its_limit_for_factorize_solve_and_to_dense(no_elimination):
    torch.manual_seed(0)
    chain = ts.Chain(mlp([8, 64, 64, 4]), nn.CrossEntropyLoss())
    X, y = data(16, 8, classes=4)  # activations of 1 024: the factorization needs ~100 MB
    curv = chain.curvature(X, y)
    need = curv.factorization_memory(1e-3).total
    limit = need // 2
    curv = chain.curvature(X, y, memory_limit=limit)  # the pass fits, the factorization not
    assert curv.memory_limit == limit
    b = torch.randn(curv.num_parameters)
    for call in (lambda: curv.factorize(1e-3), lambda: curv.solve(b, 1e-3)):
        with pytest.raises(ts.ResourceError) as info:
            call()
        assert need <= info.value.estimate <= need + 8 * 8 * b.numel() and info.value.limit == limit
    with pytest.raises(ts.ResourceError):
        chain.inverse_hvp(X, y, b, 1e-3, memory_limit=limit)


def test_a_solve_of_too_many_right_hand_sides_is_refused_with_how_many_fit(no_elimination):
    torch.manual_seed(0)
    chain = ts.Chain(mlp([16, 128, 10]), nn.CrossEntropyLoss())
    X, y = data(4, 16)
    curv = chain.curvature(X, y, memory_limit=1e8)
    P = curv.num_parameters  # 3 466: 10 000 right-hand sides are 277 MB, the solve's vectors 8× that
    B = torch.zeros(P, 10_000)
    with pytest.raises(ts.ResourceError) as info:
        curv.solve(B, 1e-3)
    assert info.value.estimate >= 8 * B.numel() * 8 and "right-hand sides at a time fit" in str(info.value)
    with pytest.raises(ts.ResourceError) as info:
        chain.inverse_hvp(X, y, B, 1e-3, memory_limit=1e8)
    n = int(str(info.value).split("at most ")[-1].split()[0])
    assert 0 < n < 10_000 and n * 8 * P * 8 <= 1e8


def test_a_factorization_refuses_a_solve_that_would_not_fit():
    torch.manual_seed(0)
    chain = ts.Chain(mlp([16, 128, 10]), nn.CrossEntropyLoss())
    curv = chain.curvature(*data(4, 16), memory_limit=1e8)
    fact = curv.factorize(1e-3)
    B = torch.zeros(curv.num_parameters, 10_000)
    B[:, :100] = torch.randn(curv.num_parameters, 100)
    with pytest.raises(ts.ResourceError, match="right-hand sides at a time fit"):
        fact.solve(B)
    fact.solve(B[:, :100])  # fits


def test_the_limit_can_be_lifted_on_the_curvature():
    torch.manual_seed(0)
    chain = ts.Chain(mlp([8, 32, 4]), nn.CrossEntropyLoss())
    X, y = data(4, 8, classes=4)
    curv = chain.curvature(X, y, memory_limit=1e9)
    P = curv.num_parameters
    curv.memory_limit = 8 * P * P  # less than the 3P² of to_dense
    with pytest.raises(ts.ResourceError) as info:
        curv.to_dense()
    assert "Curvature.to_dense" in str(info.value)
    curv.memory_limit = None
    H = curv.to_dense()
    torch.testing.assert_close(H, H.mT, rtol=0, atol=0)
    with pytest.raises(ValueError):
        curv.memory_limit = -1


@pytest.mark.parametrize("limit, error", [(0, ValueError), (-5, ValueError), (math.nan, ValueError),
                                          ("1e9", TypeError), (True, TypeError)])
def test_an_invalid_limit_is_refused_before_any_work(limit, error, monkeypatch):
    chain = ts.Chain(mlp([4, 8, 2]), nn.CrossEntropyLoss())
    X, y = data(2, 4, classes=2)

    def reached(*args, **kwargs):
        raise AssertionError("the forward pass was reached")

    monkeypatch.setattr(chain.blocks[0], "forward", reached)
    for call in (
        lambda: chain.curvature(X, y, memory_limit=limit),
        lambda: chain.hvp(X, y, torch.zeros(58), memory_limit=limit),
        lambda: chain.inverse_hvp(X, y, torch.zeros(58), 1.0, memory_limit=limit),
    ):
        with pytest.raises(error, match="memory_limit must be"):
            call()


def test_at_zero_damping_the_kkt_system_is_counted_and_a_positive_damping_named():
    torch.manual_seed(0)
    chain = ts.Chain(mlp([32, 32, 32, 4]), nn.CrossEntropyLoss())
    X, y = data(2, 32, classes=4)  # 2 samples: every Linear has a complement (singular at ε = 0)
    curv = chain.curvature(X, y)
    riccati, kkt = curv.factorization_memory(1e-3).total, curv.factorization_memory(0.0).total
    assert kkt > 10 * riccati
    curv.memory_limit = (riccati + kkt) // 2
    curv.factorize(1e-3)
    with pytest.raises(ts.ResourceError) as info:
        curv.factorize(0.0)
    assert "KKT" in info.value.largest and "a damping > 0 needs" in str(info.value)


def test_the_estimate_is_made_once_per_shape(monkeypatch):
    """The check is shape arithmetic, and at a shape seen before a dictionary lookup."""
    calls = []
    original = LinearBlock.oracle_bytes

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LinearBlock, "oracle_bytes", counting)
    chain = ts.Chain(mlp([8, 16, 4]), nn.CrossEntropyLoss())
    X, y = data(4, 8, classes=4)
    chain.curvature(X, y)
    chain.curvature(X, y)
    chain.curvature(X, y, kind="hessian", memory_limit=1e12)
    assert len(calls) == 2  # two Linear blocks, once
    chain.curvature(X[:2], y[:2])
    assert len(calls) == 4


def test_blocks_state_their_oracle_memory():
    """Every built-in block implements the protocol; a subclass of ``Block`` that overrides
    ``oracle`` but not ``oracle_bytes`` counts as not stated (not as the fallback)."""
    torch.manual_seed(0)
    modules = [nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.ReLU(), nn.Flatten(), nn.Identity(), nn.Linear(6, 2)]
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    for block in chain.blocks:
        assert isinstance(block, ts.blocks.OracleMemory)
    assert isinstance(chain.loss_block, ts.blocks.OracleMemory)
    from tallskinny.blocks.elementwise import TanhBlock

    class Custom(TanhBlock):
        def oracle(self, z, params, g, *, second_order=True):
            return super().oracle(z, params, g, second_order=second_order)

    assert Custom(nn.Tanh()).oracle_bytes((4, 6), (4, 6), second_order=True, itemsize=8) == (2 * 24 * 8, 2 * 24 * 8)
    block = ts.blocks.FuncBlock(nn.Softsign())
    assert block.oracle_bytes((4, 6), (4, 6), second_order=True, itemsize=8) == func_oracle_bytes(
        24, 24, 0, second_order=True, itemsize=8
    )

    class Overrides(ts.blocks.Block):
        def oracle(self, z, params, g, *, second_order=True):
            return super().oracle(z, params, g, second_order=second_order)

    assert Overrides(nn.Softsign()).oracle_bytes((4, 6), (4, 6), second_order=True, itemsize=8) == (0, 0)


def test_available_memory_reads_the_machine():
    available = resources.available_memory()
    if sys.platform.startswith("linux"):
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        assert 0 < available <= total
    assert resources.available_memory(torch.device("meta")) is None


def test_format():
    assert resources.format_bytes(131_072_000_000) == "131.1 GB"
    assert resources.format_bytes(129_412_515_520_800) == "129.4 TB"
    assert resources.format_bytes(512) == "512 B"
    assert resources.format_bytes(1_035_300_000_000_000) == "1.0 PB"
    assert resources.format_count(131072) == "131 072"


# -- the estimate against the truth ----------------------------------------------------------
MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from torch import nn
    import tallskinny as ts
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    def peak(fn):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = rss("VmRSS")
        fn()
        return rss("VmHWM") - base

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def layers(widths, act=nn.Tanh):
        out = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            out += [nn.Linear(a, b), act()]
        return out + [nn.Linear(widths[-2], widths[-1])]

    torch.manual_seed(0)
    out = {}
    models = {
        "mlp": (layers([16, 64, 64, 10]), torch.randn(16, 16), torch.randint(0, 10, (16,))),
        "relu": (layers([16, 64, 64, 64, 10], nn.ReLU), torch.randn(16, 16), torch.randint(0, 10, (16,))),
        "small": (layers([16, 48, 48, 10]), torch.randn(4, 16), torch.randint(0, 10, (4,))),
    }
    for name, (modules, X, y) in models.items():
        chain = ts.Chain(modules, nn.CrossEntropyLoss())
        chain.curvature(X[:1], y[:1]).factorize(1e-2)  # torch's own first-use allocations
        kinds = ("hessian", "ggn") if name != "small" else ("hessian",)
        for kind in kinds:
            curv = chain.curvature(X, y, kind=kind, method="riccati")  # the elimination's estimate
            if name != "small":
                estimate = curv.factorization_memory(1e-3).total
                out[f"{name} {kind} factorize"] = (estimate, peak(lambda: curv.factorize(1e-3)))
        if name == "small":  # P = 3 658: the dense matrix is 107 MB
            curv.memory_limit = 1
            try:
                curv.to_dense()
            except ts.ResourceError as err:
                estimate = err.estimate
            curv.memory_limit = None
            out["small to_dense"] = (estimate, peak(curv.to_dense))
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux's /proc")
def test_the_estimate_bounds_the_measured_peak_within_a_small_factor():
    """The peak resident memory of factorize and to_dense (VmHWM in a fresh process, large
    allocations made with mmap so that a free returns them at once) is below the estimate,
    and at least half of it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for what, (estimate, actual) in results.items():
        assert actual > 20e6, (what, actual)  # large enough to measure
        assert actual <= estimate <= 2 * actual, (what, estimate / actual)
