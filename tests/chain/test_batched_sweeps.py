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
from tallskinny import elimination
from tallskinny.testing import dense_ggn, dense_hessian
from tallskinny.elimination.stages import run as run_stage
from tallskinny.elimination.riccati import RiccatiFactorization
from tallskinny.elimination.algebra import StageSingular
from tallskinny.elimination import runs

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
    return [(a, b) for a, b, f in fact._inner._sweep_plan()[0] if isinstance(f, run_stage.BatchedRun)]


def _stagewise_factor(curv, damping, monkeypatch):
    """The factorization of ``curv`` with every block its own stage (no runs)."""
    with monkeypatch.context() as m:
        m.setattr(runs, "MIN_RUN", 10**9)
        stages = elimination.prepare_stages(curv.oracles, curv.loss_oracle, curv._compiled_oracles()[0])
    assert not any(isinstance(s, run_stage.LinearRunStage) for s in stages)
    return elimination.factorize(curv.oracles, curv.loss_oracle, damping, stages)


def _stagewise(curv, damping, b, monkeypatch):
    return _stagewise_factor(curv, damping, monkeypatch).solve(b.reshape(b.shape[0], -1)).reshape(b.shape)


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "gelu", "identity"])
@pytest.mark.parametrize("damping", [1e-6, 1e-3, 0.1])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_solve_matches_stagewise_and_dense(act, damping, kind, bias, monkeypatch):
    chain, X, y = _chain(act, bias=bias)
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


@pytest.mark.parametrize("bias", [True, False])
def test_dead_relu_units_and_an_indefinite_system(bias, monkeypatch):
    # (seeds where some units are dead and H + εI is indefinite)
    chain, X, y = _chain("relu", depth=10, width=6, d_in=6, seed=3 if bias else 6, bias=bias)
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


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("d_in", [5, 3])
def test_block_of_right_hand_sides_equals_columns(bias, kind, d_in, monkeypatch):
    """``k = 3`` columns swept at once (one ``m × k`` product per layer) equal the
    one-column sweeps, and ``k = 0`` columns give an empty answer; ``d_in = 3``: the run starts after a non-square Linear, so a
    tangent enters it and an adjoint leaves it."""
    chain, X, y = _chain("tanh", bias=bias, d_in=d_in)
    curv = chain.curvature(X, y, kind=kind)
    fact = curv.factorize(1e-2)
    assert _runs(fact) == ([(0, 16)] if d_in == 5 else [(2, 16)])
    B = torch.randn(curv.num_parameters, 3, dtype=torch.float64)
    XB = fact.solve(B, refine=0)
    cols = torch.stack([fact.solve(B[:, i], refine=0) for i in range(3)], dim=1)  # k = 1
    assert rel(XB, cols) <= 1e-12
    assert rel(XB, _stagewise(curv, 1e-2, B, monkeypatch)) <= 1e-10  # k = 3 per stage
    HB = curv._apply(B, shift=0.3)  # the runs' k-column products, as the solve's check makes them
    assert rel(HB, torch.stack([curv._apply(B[:, i : i + 1], shift=0.3)[:, 0] for i in range(3)], dim=1)) <= 1e-13
    assert curv._apply(B[:, :0]).shape == fact.solve(B[:, :0]).shape == (curv.num_parameters, 0)  # k = 0


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("damping", [1e-6, 1e-3, 0.1])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("bias", [True, False])
def test_run_logdet_and_inertia_match_stagewise_and_dense(act, damping, kind, bias, monkeypatch):
    """A run stage's ``log|det|`` and inertia: those of the per-stage elimination and of
    the dense matrix (indefinite at this initialisation for the Hessian)."""
    chain, X, y = _chain(act, depth=10, width=5, d_in=5, seed=1, bias=bias)
    curv = chain.curvature(X, y, kind=kind)
    fact = curv.factorize(damping)
    assert _runs(fact) == [(0, 18)]
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    M = H + damping * torch.eye(H.shape[0], dtype=torch.float64)
    eig = torch.linalg.eigvalsh(M)
    inertia = fact.inertia()
    assert (inertia.positive, inertia.negative, inertia.zero) == (int((eig > 0).sum()), int((eig < 0).sum()), 0)
    if kind == "hessian" and (bias or damping < 0.1):
        assert inertia.negative > 0
    assert abs(float(fact.logdet()) - float(eig.abs().log().sum())) <= 1e-9 * abs(float(eig.abs().log().sum()))
    stagewise = _stagewise_factor(curv, damping, monkeypatch)
    assert abs(float(fact.logdet()) - float(stagewise.logdet())) <= 1e-10 * abs(float(stagewise.logdet()))
    assert stagewise.inertia() == inertia


def test_small_pivots_are_found_in_the_first_eliminated_layer():
    """The run's pivot test: the largest layer index (the first eliminated) whose LU has a
    pivot at or below ``pivot_tolerance·max|Q|``, NaN pivots included."""
    torch.manual_seed(0)
    Q = torch.randn(5, 4, 4, dtype=torch.float64)
    Q = Q + Q.mT
    Q[1, :, 0] = Q[1, :, 1]  # singular
    Q[1, 0, :] = Q[1, 1, :]
    lu = torch.linalg.lu_factor_ex(Q).LU
    scales = Q.abs().amax(dim=(1, 2))
    assert run_stage._first_small_pivot(lu, scales) == 1
    lu[3, 2, 2] = float("nan")
    assert run_stage._first_small_pivot(lu, scales) == 3
    assert run_stage._first_small_pivot(lu[[0, 2, 4]], scales[[0, 2, 4]]) is None


def test_singular_layer_inside_a_run_falls_back_to_the_pivoted_factorization(monkeypatch):
    """A run that reports a singular layer: the factorization says which block it is, and
    goes to the pivoted KKT system, which solves exactly (``H + εI`` itself is regular)."""
    chain, X, y = _chain("tanh", depth=9, width=5, d_in=5, seed=0)
    curv = chain.curvature(X, y)
    stages = curv._prepared_stages()
    assert isinstance(stages[0], run_stage.LinearRunStage)
    damping = 1e-3
    with monkeypatch.context() as m:
        m.setattr(run_stage, "_first_small_pivot", lambda lu, scales: 5)
        with pytest.raises(StageSingular) as err:
            RiccatiFactorization(stages, curv.loss_oracle, damping)
        assert err.value.stage == 10  # layer 5 of the run: block 2·5
        fact = curv.factorize(damping)
    assert isinstance(fact._inner, elimination.KKTFactorization)
    H = dense_hessian(chain, X, y)
    M = H + damping * torch.eye(H.shape[0], dtype=torch.float64)
    b = torch.randn(H.shape[0], dtype=torch.float64)
    assert rel(fact.solve(b, refine=0), torch.linalg.solve(M, b)) <= 1e-9


def test_zero_damping_through_a_run_is_the_per_stage_answer(monkeypatch):
    """At ε = 0 the complement of every Linear in the run has pivot 0: the run hands over
    exactly as its last Linear's stage would (to the KKT factorization, or the error that
    no path carries those directions to the loss)."""
    chain, X, y = _chain("tanh", depth=9, width=5, d_in=5, seed=0)
    for kind in ("hessian", "ggn"):
        curv = chain.curvature(X, y, kind=kind)
        stagewise_error = run_error = None
        try:
            stagewise = _stagewise_factor(curv, 0.0, monkeypatch)
        except ts.SingularSystemError as err:
            stagewise_error = err
        try:
            fact = curv.factorize(0.0)
        except ts.SingularSystemError as err:
            run_error = err
        assert (stagewise_error is None) == (run_error is None)
        if run_error is not None:
            assert str(run_error) == str(stagewise_error)
        else:
            assert type(fact._inner) is type(stagewise)
            assert isinstance(fact._inner, elimination.KKTFactorization)


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_hvp_of_a_run_entered_by_a_tangent(act, kind, bias):
    """A run after a non-square Linear: the tangent entering it is not zero."""
    chain, X, y = _chain(act, d_in=3, bias=bias)
    curv = chain.curvature(X, y, kind=kind)
    runs, _ = curv._compiled_oracles()[0].run_plan()
    assert sorted((start, end) for start, (end, _) in runs.items()) == [(2, 16)]
    P = curv.num_parameters
    v = torch.randn(P, dtype=torch.float64)
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    assert rel(curv.hvp(v), H @ v) <= 1e-12
    # H v + s·v as the solve's check makes it (run and per-block parts, one and two columns)
    V = torch.randn(P, 2, dtype=torch.float64)
    assert rel(curv._apply(v[:, None], shift=0.3), (H @ v + 0.3 * v)[:, None]) <= 1e-12
    assert rel(curv._apply(V, shift=0.3), H @ V + 0.3 * V) <= 1e-12
    # the solve's check uses the same products: a solve is exact too
    x = curv.factorize(1e-3).solve(v)
    assert rel(x, torch.linalg.solve(H + 1e-3 * torch.eye(P, dtype=torch.float64), v)) <= 1e-9


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_bias_free_runs_take_the_batched_path_with_the_biased_layout(kind):
    """Bias-free layers form runs (θ = vec(W) per layer, found from ``p``), and a chain
    mixing biased and bias-free layers splits its runs where the layout changes."""
    torch.manual_seed(4)
    modules = mlp(11, 5, 5, 3, act="tanh", bias=False)
    for i in range(10, 20, 2):  # the last five Linear layers of the run get a bias
        modules[i] = nn.Linear(5, 5)
    modules[-1] = nn.Linear(5, 3)
    chain, X, y = ts.Chain(modules, nn.CrossEntropyLoss()), torch.randn(1, 5), torch.tensor([2])
    curv = chain.curvature(X, y, kind=kind)
    runs_found, _ = curv._compiled_oracles()[0].run_plan()
    assert sorted((start, end, run.bias) for start, (end, run) in runs_found.items()) == [(0, 10, False), (10, 20, True)]
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    P = H.shape[0]
    v = torch.randn(P, dtype=torch.float64)
    assert rel(curv.hvp(v), H @ v) <= 1e-12
    fact = curv.factorize(1e-3)
    assert _runs(fact) == [(0, 10), (10, 20)]
    M = H + 1e-3 * torch.eye(P, dtype=torch.float64)
    assert rel(fact.solve(v, refine=0), torch.linalg.solve(M, v)) <= 1e-9
    eig = torch.linalg.eigvalsh(M)
    assert abs(float(fact.logdet()) - float(eig.abs().log().sum())) <= 1e-9 * abs(float(eig.abs().log().sum()))
    assert fact.inertia().negative == int((eig < 0).sum())


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_bias_free_layer_with_zero_input_leaves_the_run_to_the_per_stage_path(kind):
    """Without a bias, ``x = 0`` (here after a zero weight: tanh(0) = 0) makes ``G_V`` rank
    zero: the run stage would divide by ``σ = 0``; the layers go through the per-stage
    elimination, which handles ``r = 0``, and the answers stay exact (``H ≠ 0`` through
    the second-order cross terms of the zero layer)."""
    torch.manual_seed(5)
    modules = mlp(9, 5, 5, 3, act="tanh", bias=False)
    with torch.no_grad():
        modules[4].weight.zero_()  # the inputs of every later Linear are 0
    X = torch.randn(1, 5)
    chain, y = ts.Chain(modules, nn.CrossEntropyLoss()), torch.tensor([0])
    curv = chain.curvature(X, y, kind=kind)
    runs_found, _ = curv._compiled_oracles()[0].run_plan()
    assert [(start, end) for start, (end, _) in runs_found.items()] == [(0, 16)]  # the HVP run is fine with x = 0 …
    fact = curv.factorize(1e-2)
    assert _runs(fact) == []  # … the elimination's run stage is not
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    P = H.shape[0]
    b = torch.randn(P, dtype=torch.float64)
    M = H + 1e-2 * torch.eye(P, dtype=torch.float64)
    assert H.abs().max() > 1e-5
    assert rel(fact.solve(b, refine=0), torch.linalg.solve(M, b)) <= 1e-9
    assert rel(curv.hvp(b), H @ b) <= 1e-12
