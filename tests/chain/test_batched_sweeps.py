"""The solve sweeps batched over runs of one-sample Linear + activation layers.

They must give what the per-stage sweeps give (to rounding) and what a dense solve gives,
for every activation (dead ReLU units included), at small, moderate and indefinite
damping; runs must be found exactly where the layers fit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import batched_sweeps
from tallskinny.testing import dense_ggn, dense_hessian

from models import ACTIVATIONS, mlp


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _chain(act="tanh", depth=9, width=5, d_in=5, seed=0, bias=True):
    torch.manual_seed(seed)
    modules = mlp(depth, width, d_in, 3, act=act, bias=bias)
    X = torch.randn(1, d_in)
    y = torch.tensor([1])
    return ts.Chain(modules, nn.CrossEntropyLoss()), X, y


def _runs(fact):
    return [(a, b) for a, b, f in fact._inner._sweep_plan() if isinstance(f, batched_sweeps.BatchedRun)]


def _stagewise(curv, damping, b, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(batched_sweeps, "MIN_RUN", 10**9)
        fact = curv.factorize(damping)
        assert _runs(fact) == []
        return fact.solve(b, refine=0)


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "gelu", "identity"])
@pytest.mark.parametrize("damping", [1e-6, 1e-3, 0.1])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_batched_solve_matches_stagewise_and_dense(act, damping, kind, monkeypatch):
    chain, X, y = _chain(act)
    curv = chain.curvature(X, y, kind=kind)
    P = curv.num_parameters
    b = torch.randn(P, dtype=torch.float64)
    fact = curv.factorize(damping)
    x = fact.solve(b, refine=0)
    if act == "identity":  # nn.Identity has no diagonal Jacobian: no run, same answer
        assert _runs(fact) == []
    else:
        assert _runs(fact) == [(0, 16)]  # eight (Linear, activation) pairs; the last Linear is alone
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    M = H + damping * torch.eye(P, dtype=torch.float64)
    cond = torch.linalg.cond(M).item()
    tol = max(1e-10, 10 * torch.finfo(torch.float64).eps * cond)
    assert rel(x, _stagewise(curv, damping, b, monkeypatch)) <= tol
    assert rel(x, torch.linalg.solve(M, b)) <= max(1e-9, tol)


def test_dead_relu_units_and_an_indefinite_system(monkeypatch):
    chain, X, y = _chain("relu", depth=10, width=6, d_in=6, seed=3)
    curv = chain.curvature(X, y)
    H = dense_hessian(chain, X, y)
    dead = sum(int((o.F.diagonal == 0).sum()) for o in curv.oracles if o.G.shape[1] == 0)
    assert dead > 0
    damping = 1e-3
    eig = torch.linalg.eigvalsh(H)
    assert float(eig.min()) < -10 * damping  # H + εI indefinite
    P = H.shape[0]
    M = H + damping * torch.eye(P, dtype=torch.float64)
    fact = curv.factorize(damping)
    assert _runs(fact)
    b = torch.randn(P, dtype=torch.float64)
    x = fact.solve(b, refine=0)
    cond = torch.linalg.cond(M).item()
    tol = max(1e-9, 10 * torch.finfo(torch.float64).eps * cond)
    assert rel(x, torch.linalg.solve(M, b)) <= tol
    assert rel(x, _stagewise(curv, damping, b, monkeypatch)) <= tol


def test_block_of_right_hand_sides_equals_columns():
    chain, X, y = _chain("tanh")
    fact = chain.curvature(X, y).factorize(1e-2)
    B = torch.randn(fact.solve(torch.zeros(chain.layout().numel)).shape[0], 3, dtype=torch.float64)
    XB = fact.solve(B, refine=0)  # k = 3: the per-stage sweeps
    cols = torch.stack([fact.solve(B[:, i], refine=0) for i in range(3)], dim=1)  # k = 1: batched
    assert rel(XB, cols) <= 1e-12


def test_runs_are_found_where_layers_fit():
    # input width 7 ≠ width 5: the first pair differs in shape and stays alone
    chain, X, y = _chain("tanh", depth=7, width=5, d_in=7)
    fact = chain.curvature(X, y).factorize(0.1)
    assert _runs(fact) == [(2, 12)]
    # too short a chain: no run
    chain, X, y = _chain("tanh", depth=4, width=5, d_in=5)
    fact = chain.curvature(X, y).factorize(0.1)
    assert _runs(fact) == []
    # no bias: Ẽ = I, not the batched layout
    chain, X, y = _chain("tanh", depth=7, width=5, d_in=5, bias=False)
    fact = chain.curvature(X, y).factorize(0.1)
    assert _runs(fact) == []


def test_batches_of_samples_keep_the_per_stage_sweeps():
    torch.manual_seed(0)
    chain = ts.Chain(mlp(8, 4, 4, 3, act="tanh"), nn.CrossEntropyLoss())
    X, y = torch.randn(2, 4), torch.tensor([0, 2])
    curv = chain.curvature(X, y)
    fact = curv.factorize(0.1)
    assert _runs(fact) == []
    b = torch.randn(curv.num_parameters, dtype=torch.float64)
    M = dense_hessian(chain, X, y) + 0.1 * torch.eye(b.shape[0], dtype=torch.float64)
    assert rel(fact.solve(b), torch.linalg.solve(M, b)) <= 1e-10


# -- Hessian-vector products batched over the same runs ------------------------------------
from tallskinny import batched_products  # noqa: E402


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "softplus", "identity"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_batched_hvp_matches_per_block_and_dense(act, kind, monkeypatch):
    chain, X, y = _chain(act, d_in=5)
    curv = chain.curvature(X, y, kind=kind)
    runs, _ = curv._compiled_oracles()[0].run_plan()
    if act == "identity":
        assert runs == {}
    else:
        assert {start: end for start, (end, _) in runs.items()} == {0: 16}
    v = torch.randn(curv.num_parameters, dtype=torch.float64)
    hv = curv.hvp(v)
    assert rel(hv, curv.to_dense() @ v) <= 1e-12
    with monkeypatch.context() as m:
        m.setattr(batched_products, "MIN_RUN", 10**9)
        fresh = chain.curvature(X, y, kind=kind)
        assert fresh._compiled_oracles()[0].run_plan()[0] == {}
        assert rel(hv, fresh.hvp(v)) <= 1e-13
    # k = 2 vectors take the per-block products: the same columns
    V = torch.stack([v, torch.randn_like(v)], dim=1)
    HV = curv.hvp(V)
    assert rel(HV[:, 0], hv) <= 1e-13 and rel(HV[:, 1], curv.hvp(V[:, 1])) <= 1e-13


def test_batched_hvp_against_torch_func_hessian():
    from tallskinny.testing import dense_hessian as ref_hessian

    chain, X, y = _chain("tanh", depth=8, width=4, d_in=6, seed=2)  # first pair alone (6 → 4)
    curv = chain.curvature(X, y)
    runs, _ = curv._compiled_oracles()[0].run_plan()
    assert {start: end for start, (end, _) in runs.items()} == {2: 14}
    H = ref_hessian(chain, X, y)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for j in range(3):
        assert rel(chain.hvp(X, y, V[:, j]), H @ V[:, j]) <= 1e-12


def test_blocks_inside_runs_never_compile_their_products():
    """The per-block products are made on first use only: a solve with its check through
    batched runs leaves the run's blocks uncompiled; asking for a product compiles it."""
    chain, X, y = _chain("tanh", d_in=5)
    curv = chain.curvature(X, y)
    b = torch.randn(curv.num_parameters, dtype=torch.float64)
    curv.factorize(1e-3).solve(b)  # refine=None: the check's HVP runs too
    blocks = curv._compiled_oracles()[0]
    assert all(c._oracle is not None for c in blocks[:16])  # the run
    assert blocks[16]._oracle is None  # the last Linear, outside the run
    v = b[:blocks[0].p].reshape(-1, 1)
    assert blocks[0].G(v).shape == (5, 1) and blocks[0]._oracle is None


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_batched_runs_in_float32(act):
    """float32 through the batched sweeps and HVPs: within 1e-3 of the float64 dense
    solve of the same (float32-valued) model where cond ≤ 1e4."""
    import copy

    chain, X, y = _chain(act, d_in=5)
    modules32 = [copy.deepcopy(m).float() for m in chain.modules]
    curv32 = ts.Chain(modules32, nn.CrossEntropyLoss()).curvature(X.float(), y)
    # the float64 reference of the same (float32-valued) model
    reference = ts.Chain([copy.deepcopy(m).double() for m in modules32], nn.CrossEntropyLoss())
    H = dense_hessian(reference, X.float().double(), y)  # torch.func
    damping = 0.1
    M = H + damping * torch.eye(H.shape[0], dtype=torch.float64)
    assert torch.linalg.cond(M).item() <= 1e4
    fact = curv32.factorize(damping)
    assert _runs(fact) == [(0, 16)]
    b = torch.randn(H.shape[0], dtype=torch.float64)
    x = fact.solve(b.float())
    assert x.dtype == torch.float32
    assert rel(x.double(), torch.linalg.solve(M, b)) <= 1e-3
    assert rel(curv32.hvp(b.float()).double(), H @ b) <= 1e-5
