"""The refinement policy of ``Factorization.solve``: automatic by default, explicit on request."""

from __future__ import annotations

import pytest
import torch

import tallskinny as ts
from models import make_case
from tallskinny.testing import dense_hessian
from tallskinny import elimination


def _setup(name, seed):
    modules, loss, X, y = make_case(name, seed)
    chain = ts.Chain(modules, loss)
    return chain.curvature(X, y), dense_hessian(chain, X, y)


def _backward_error(M, x, b):
    return ((b - M @ x).norm() / (torch.linalg.matrix_norm(M, 2) * x.norm() + b.norm())).item()


def test_moderate_damping_needs_no_refinement():
    """At ε = 0.1 the unrefined solve is backward stable: the check finds nothing to do."""
    curv, H = _setup("tanh", 1)
    fact = curv.factorize(0.1)
    b = torch.randn(curv.num_parameters, generator=torch.Generator().manual_seed(0))
    x0 = fact.solve(b, refine=0)
    M = H + 0.1 * torch.eye(H.shape[0])
    assert _backward_error(M, x0, b) <= ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    assert torch.equal(fact.solve(b), x0)


@pytest.mark.parametrize("seed", [1, 2])
def test_small_damping_refines_and_is_accurate(seed):
    """ReLU nets at ε = 1e-6: without refinement the error is far above eps·cond (the
    elimination does not pivot across blocks); the default sees the backward error and refines."""
    curv, H = _setup("relu", seed)
    damping = 1e-6
    fact = curv.factorize(damping)
    M = H + damping * torch.eye(H.shape[0])
    eig = torch.linalg.eigvalsh(M)
    cond = (eig.abs().max() / eig.abs().min()).item()
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.solve(M, b)
    err = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    tol = 10 * torch.finfo(torch.float64).eps * cond
    assert err(fact.solve(b, refine=0)) > tol  # the step is needed here, not decoration
    x = fact.solve(b)
    assert err(x) <= tol
    assert _backward_error(M, x, b) <= ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    assert err(fact.solve(b, refine=2)) <= tol


def test_check_is_per_column():
    """With k right-hand sides, one column above tolerance is enough to refine."""
    curv, H = _setup("relu", 1)
    fact = curv.factorize(1e-6)
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(H.shape[0], 3, generator=gen)
    X = fact.solve(B)
    for j in range(3):
        torch.testing.assert_close(X[:, j], fact.solve(B[:, j]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_refine_values(bad):
    curv, _ = _setup("tanh", 1)
    with pytest.raises(ValueError, match="refine"):
        curv.factorize(0.1).solve(torch.zeros(curv.num_parameters), refine=bad)


@pytest.mark.parametrize("width", [3, 6])
@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.ReLU, torch.nn.Sigmoid])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradient_bound_is_a_lower_bound_of_the_norm(width, act, kind, batch):
    """The bound the check falls back on before refining, ``‖Hg‖/‖g‖``, never exceeds
    ``‖H‖₂`` (an overestimate would hide backward errors) and is not trivially small."""
    torch.manual_seed(width)
    modules = [torch.nn.Linear(4, width), act(), torch.nn.Linear(width, width), act(), torch.nn.Linear(width, 3)]
    chain = ts.Chain(modules, torch.nn.CrossEntropyLoss())
    X, y = 2 * torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    curv = chain.curvature(X, y, kind=kind)
    bound = curv._gradient_norm_bound()
    norm = torch.linalg.matrix_norm(curv.to_dense(), 2).item()
    assert 0.1 * norm < bound <= norm * (1 + 1e-12)


def _deep_tanh(depth=16):
    torch.manual_seed(1)
    modules = []
    for _ in range(depth):
        lin = torch.nn.Linear(8, 8)
        torch.nn.init.orthogonal_(lin.weight)
        modules += [lin, torch.nn.Tanh()]
    chain = ts.Chain(modules + [torch.nn.Linear(8, 10)], torch.nn.CrossEntropyLoss())
    return chain, torch.randn(1, 8), torch.tensor([3])


@pytest.mark.parametrize("block_bound", [1.0, 0.5, 0.0])
def test_norm_bounds_spare_the_refinement_of_deep_tanh_nets(block_bound, monkeypatch):
    """A deep tanh MLP at ε = 0.1 is solved to rounding level by the bare sweeps, but the
    cheap bounds of ‖H‖ from the solve itself are ~20× low: the check falls back on the
    better bounds (the diagonal blocks of the last Linear layers, then ‖Hg‖/‖g‖), each
    computed at most once per curvature, and refines neither then nor later.

    Which of the two bounds suffices is decided by rounding (the block bound leaves the
    estimated backward error at 0.74 of the tolerance here and 0.97 on another machine,
    issue 14): the test asserts what holds whichever fires — the answer, no refinement,
    no warning, each bound at most once — not which one it was. ``block_bound`` scales
    the block bound: ``0.5`` makes it fall short as it did there, ``0`` drops it."""
    calls = {"blocks": 0, "gradient": 0}
    blocks = elimination.last_blocks_norm_bound

    def counted_blocks(*args, **kwargs):
        calls["blocks"] += 1
        return block_bound * blocks(*args, **kwargs)

    monkeypatch.setattr(elimination, "last_blocks_norm_bound", counted_blocks)
    chain, X, y = _deep_tanh()
    curv = chain.curvature(X, y)
    gradient_bound = curv._gradient_norm_bound

    def counted_gradient():
        calls["gradient"] += 1
        return gradient_bound()

    monkeypatch.setattr(curv, "_gradient_norm_bound", counted_gradient)
    fact = curv.factorize(0.1)
    b = torch.randn(curv.num_parameters)
    x0 = fact.solve(b, refine=0)
    M = curv.to_dense() + 0.1 * torch.eye(b.shape[0])
    tol = ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    # the bare sweeps are backward stable (0.05–0.06 of the tolerance on two machines)...
    assert _backward_error(M, x0, b) <= tol / 4
    # ... but the cheap bound ‖(H+εI)x‖/‖x‖ alone would refine (6.5–8.5× the tolerance)
    r = b - M @ x0
    cheap = float((M @ x0).norm() / x0.norm())
    assert float(r.norm()) > 2 * tol * (cheap * float(x0.norm()) + float(b.norm()))
    assert torch.equal(fact.solve(b), x0)  # checked, not refined, no AccuracyWarning
    for rhs in (b, torch.randn(b.shape[0]), torch.randn(b.shape[0], 3)):
        assert torch.equal(fact.solve(rhs), fact.solve(rhs, refine=0))  # not refined
    assert curv.checks.refinements == 0
    assert calls["blocks"] == 1 and calls["gradient"] <= 1  # each bound once per curvature
    if block_bound < 1.0:
        assert calls["gradient"] == 1  # the only bound left that spares the refinement
    H_norm = float(torch.linalg.matrix_norm(M, 2)) - 0.1
    assert curv.checks.norm_bound <= H_norm * (1 + 1e-12)  # a lower bound of ‖H‖, whichever fired


@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.ReLU, torch.nn.Sigmoid])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("width", [4, 7])
def test_last_blocks_bound_is_a_lower_bound_of_the_norm(act, kind, width):
    """``max ‖H_ll‖`` over the last Linear blocks never exceeds ``‖H‖₂`` and equals the
    largest of the dense diagonal blocks it covers."""
    torch.manual_seed(width)
    modules = []
    for _ in range(5):
        modules += [torch.nn.Linear(width, width), act()]
    chain = ts.Chain(modules + [torch.nn.Linear(width, 3)], torch.nn.CrossEntropyLoss())
    X, y = 2 * torch.randn(1, width), torch.tensor([1])
    curv = chain.curvature(X, y, kind=kind)
    bound = elimination.last_blocks_norm_bound(curv._compiled_oracles()[0], curv.loss_oracle.E.to_dense())
    H = curv.to_dense()
    # the dense diagonal blocks of the last four Linear layers (θ = [vec(W), b] each)
    sizes = [o.G.shape[1] for o in curv.oracles]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    linear = [i for i, p in enumerate(sizes) if p][-4:]
    blocks = [H[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]] for i in linear]
    expected = max(float(torch.linalg.matrix_norm(B, 2)) for B in blocks)
    assert abs(bound - expected) <= 1e-10 * expected
    assert 0 < bound <= float(torch.linalg.matrix_norm(H, 2)) * (1 + 1e-12)


@pytest.mark.parametrize("damping", [1e-6, 0.1])
def test_checks_reuse_one_buffer_without_changing_any_solution(damping):
    """The check's ``(H+εI)x`` (and residual) live in one buffer reused by later solves of
    a factorization: every solve equals the same solve on a fresh factorization, in any
    order, refined or not."""
    chain, X, y = _deep_tanh(depth=6)
    curv = chain.curvature(X, y)
    fact = curv.factorize(damping)
    gen = torch.Generator().manual_seed(0)
    rhs = [torch.randn(curv.num_parameters, generator=gen) for _ in range(3)]
    first = [fact.solve(b) for b in rhs]
    assert fact._scratch is not None
    for b, x in zip(reversed(rhs), reversed(first)):
        assert torch.equal(fact.solve(b), x)
        fresh = chain.curvature(X, y)
        fresh.checks.norm_bound, fresh.checks.blocks_done = curv.checks.norm_bound, curv.checks.blocks_done
        fresh.checks.gradient_done, fresh.checks.refinements = curv.checks.gradient_done, curv.checks.refinements
        assert torch.equal(fresh.factorize(damping).solve(b), x)


def test_refinement_is_repeated_until_backward_stable(monkeypatch):
    """An inner solver with a 1e-6 relative error: one refinement step leaves a backward
    error near 1e-12, above tolerance; the default checks again and refines once more."""
    curv, H = _setup("tanh", 1)
    damping = 0.1
    fact = curv.factorize(damping)
    M = H + damping * torch.eye(H.shape[0])
    P = H.shape[0]
    u = 1e-6 * (2 * torch.rand(P, 1, generator=torch.Generator().manual_seed(2)) - 1)
    exact = fact._inner.solve
    monkeypatch.setattr(fact._inner, "solve", lambda r: exact(r) * (1 + u))
    b = torch.randn(P, generator=torch.Generator().manual_seed(0))
    tol = ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    assert _backward_error(M, fact.solve(b, refine=1), b) > tol  # one step is not enough
    before = curv.checks.refinements
    x = fact.solve(b)
    assert curv.checks.refinements - before == 2
    assert _backward_error(M, x, b) <= tol


def test_relu_nets_at_tiny_damping_end_backward_stable():
    """A ReLU net at ε = 1e-8, where the elimination's pivots are unstable (unrefined
    backward errors up to 1e-10): the default ends at tolerance for every right-hand side."""
    curv, H = _setup("relu", 2)
    damping = 1e-8
    fact = curv.factorize(damping)
    M = H + damping * torch.eye(H.shape[0])
    tol = ts.curvature.BACKWARD_ERROR_TOLERANCE * torch.finfo(torch.float64).eps
    worst_unrefined = 0.0
    for seed in range(8):
        b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(seed))
        worst_unrefined = max(worst_unrefined, _backward_error(M, fact.solve(b, refine=0), b))
        assert _backward_error(M, fact.solve(b), b) <= tol
    assert worst_unrefined > 100 * tol  # the refinement had work to do


def test_stagnating_refinement_stops_and_warns(monkeypatch):
    """With products that carry a new random error of 1e-8 relative at every call the
    residual never falls below it: the refinement stops where a step does not halve the
    backward error, within ``MAX_REFINEMENTS`` steps, and says so with an
    ``AccuracyWarning``."""
    curv, H = _setup("tanh", 1)
    fact = curv.factorize(0.1)
    exact = curv._apply
    gen = torch.Generator().manual_seed(1)

    def inexact(x, out=None, shift=0.0):
        y = exact(x, out, shift)
        u = torch.randn(y.shape, generator=gen)
        return y.add_(u * (1e-8 * float(y.norm()) / float(u.norm())))

    monkeypatch.setattr(curv, "_apply", inexact)
    b = torch.randn(curv.num_parameters, generator=torch.Generator().manual_seed(0))
    before = curv.checks.refinements
    with pytest.warns(ts.AccuracyWarning, match="backward error"):
        fact.solve(b)
    assert 1 <= curv.checks.refinements - before <= ts.curvature.MAX_REFINEMENTS
    # a solve that is backward stable does not warn (the test suite turns the warning
    # into an error everywhere else)
    monkeypatch.setattr(curv, "_apply", exact)
    fact.solve(b)
