"""Every curvature quantity of a chain against dense torch.func / torch.linalg references.

float64. Tolerances: products and gradients to 1e-11 relative; solves to
``max(1e-9, 10·eps·cond)`` relative (no backward-stable solver does better than
``eps·cond`` against a dense solve, which carries that error itself); log-determinants to
``1e-9`` relative plus ``1e-13·P·cond`` absolute; inertia exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from models import CASES, make_case
from tallskinny.testing import dense_ggn, dense_gradient, dense_hessian

EPS64 = torch.finfo(torch.float64).eps
DAMPINGS = [1e-8, 1e-3, 0.1, 10.0]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_factorization(curv, M, gen, *, k=3, check_logdet=True):
    P = M.shape[0]
    eig = torch.linalg.eigvalsh(M)
    cond = (eig.abs().max() / eig.abs().min()).item()
    damping = (M - curv.to_dense()).diagonal().mean().item()
    fact = curv.factorize(damping)
    B = torch.randn(P, k, generator=gen, dtype=M.dtype)
    X = fact.solve(B)
    assert rel(X, torch.linalg.solve(M, B)) <= max(1e-9, 10 * EPS64 * cond), cond
    assert tuple(fact.inertia()) == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0)
    assert fact.sign().item() == (-1.0) ** (eig < 0).sum().item()
    logdet = eig.abs().log().sum()
    if check_logdet:
        _check_logdet(fact, logdet, P, cond)
    # the same factorization solves a single flat vector in its own format
    x = fact.solve(B[:, 0])
    assert x.shape == (P,)
    assert rel(x, X[:, 0]) <= max(1e-10, 10 * EPS64 * cond)


def _check_logdet(fact, logdet, P, cond):
    # each eigenvalue's log moves by (backward error)·‖M‖/|λ|: P·1e-13·cond bounds it
    tol = 1e-9 * max(1.0, abs(logdet.item())) + 1e-13 * P * cond
    assert abs(fact.logdet().item() - logdet.item()) <= tol


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_chain_matches_dense(name, seed, kind):
    modules, loss, X, y = make_case(name, seed)
    chain = ts.Chain(modules, loss)
    curv = chain.curvature(X, y, kind=kind)
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    P = H.shape[0]
    gen = torch.Generator().manual_seed(seed)

    torch.testing.assert_close(curv.gradient(), dense_gradient(chain, X, y), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(curv.to_dense(), H, rtol=1e-10, atol=1e-12)
    V = torch.randn(P, 4, generator=gen)
    assert rel(curv.hvp(V), H @ V) <= 1e-11
    for damping in DAMPINGS:
        check_factorization(curv, H + damping * torch.eye(P), gen)


def test_relu_logdet_at_tiny_damping():
    """A stage pivot of this ReLU net loses digits at ε = 1e-8 (element growth): the
    factorization's check sees it and log|det| comes from the pivoted factorization
    (this failed, and was marked xfail, before the check)."""
    modules, loss, X, y = make_case("relu", 2)
    chain = ts.Chain(modules, loss)
    curv = chain.curvature(X, y)
    H = dense_hessian(chain, X, y)
    for k in range(8):  # the error jumps with the last digits of ε: an unstable pivot
        damping = 1e-8 * (1 + k * 1.37e-10)
        M = H + damping * torch.eye(H.shape[0])
        eig = torch.linalg.eigvalsh(M)
        cond = (eig.abs().max() / eig.abs().min()).item()
        _check_logdet(curv.factorize(damping), eig.abs().log().sum(), H.shape[0], cond)


def test_layernorm_logdet_at_small_damping():
    """Found with the decision tests of issue 14 (independent of any tolerance): the
    directions of curvature ``≈ ε`` that LayerNorm's invariances leave are not in
    ``null(G)`` of their block, and the elimination does not pivot across blocks; the
    factorization's check sees the lost digits and takes log|det| from the pivoted
    factorization."""
    torch.manual_seed(6)
    modules = [torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)]
    chain = ts.Chain([m.double() for m in modules], torch.nn.CrossEntropyLoss())
    X, y = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    curv = chain.curvature(X, y)
    H = dense_hessian(chain, X, y)
    for damping in (1e-6, 1e-8):
        M = H + damping * torch.eye(H.shape[0])
        eig = torch.linalg.eigvalsh(M)
        cond = (eig.abs().max() / eig.abs().min()).item()
        _check_logdet(curv.factorize(damping), eig.abs().log().sum(), H.shape[0], cond)


@pytest.mark.parametrize("name", ["tanh", "relu", "fallback", "interacting", "mse_sum"])
def test_strongly_indefinite(name):
    """Large weights: hundreds of negative eigenvalues relative to P; H + εI indefinite."""
    modules, loss, X, y = make_case(name, 5)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.mul_(3.0)
    chain = ts.Chain(modules, loss)
    curv = chain.curvature(X, y)
    H = dense_hessian(chain, X, y)
    eig = torch.linalg.eigvalsh(H)
    assert (eig < -1e-3).sum() >= 2
    check_factorization(curv, H + 1e-4 * torch.eye(H.shape[0]), torch.Generator().manual_seed(0))


def test_vector_formats_round_trip():
    modules, loss, X, y = make_case("tanh", 3)
    chain = ts.Chain(modules, loss)
    curv = chain.curvature(X, y)
    params = list(chain.parameters())
    H = dense_hessian(chain, X, y)
    P = H.shape[0]
    gen = torch.Generator().manual_seed(0)
    v_list = [torch.randn(p.shape, generator=gen) for p in params]
    v_flat = torch.cat([v.reshape(-1) for v in v_list])
    out = curv.hvp(v_list)
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in params]
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), H @ v_flat, rtol=1e-11, atol=1e-13)
    # tuple with a trailing k
    vk = tuple(torch.randn(*p.shape, 2, generator=gen) for p in params)
    outk = curv.solve(vk, damping=0.5)
    assert isinstance(outk, tuple) and all(o.shape == (*p.shape, 2) for o, p in zip(outk, params))
    flat_k = torch.cat([v.reshape(-1, 2) for v in vk])
    ref = torch.linalg.solve(H + 0.5 * torch.eye(P), flat_k)
    torch.testing.assert_close(torch.cat([o.reshape(-1, 2) for o in outk]), ref, rtol=1e-10, atol=1e-12)
    # one-shot conveniences give the same numbers
    torch.testing.assert_close(chain.hvp(X, y, v_flat), H @ v_flat, rtol=1e-11, atol=1e-13)
    x = chain.inverse_hvp(X, y, v_flat, damping=0.5)
    torch.testing.assert_close(x, torch.linalg.solve(H + 0.5 * torch.eye(P), v_flat), rtol=1e-10, atol=1e-12)


def test_many_right_hand_sides_share_one_factorization():
    modules, loss, X, y = make_case("gelu", 4)
    chain = ts.Chain(modules, loss)
    curv = chain.curvature(X, y)
    H = dense_hessian(chain, X, y)
    P = H.shape[0]
    fact = curv.factorize(1e-2)
    B = torch.randn(P, 3 * P, generator=torch.Generator().manual_seed(1))
    X_ = fact.solve(B)
    assert rel(X_, torch.linalg.solve(H + 1e-2 * torch.eye(P), B)) <= 1e-9


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_sweeps_of_large_stages_take_thin_blocks_wide(kind, monkeypatch):
    """Stages of 256 rows (batch 8 × width 32) sweep a block of 4 right-hand sides with
    the wide products of ``linalg.thin``; the unrefined solve equals the dense one."""
    from tallskinny.linalg import thin

    taken = []
    wide = thin._wide
    monkeypatch.setattr(thin, "_wide", lambda M, X: taken.append(wide(M, X)) or taken[-1])
    torch.manual_seed(3)
    modules = [nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)]
    X = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(5))
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    H = (dense_hessian if kind == "hessian" else dense_ggn)(chain, X, y)
    P = H.shape[0]
    B = torch.randn(P, 4, generator=torch.Generator().manual_seed(6))
    x = chain.curvature(X, y, kind=kind, method="riccati").factorize(0.1).solve(B, refine=0)
    assert any(taken)
    assert rel(x, torch.linalg.solve(H + 0.1 * torch.eye(P), B)) <= 1e-10


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_large_stage_paths_on_every_case(name, kind):
    """``testing.large_stage_paths``: every stage of these small models sweeps its blocks
    of right-hand sides with the wide products and forms a dense stage's Schur complement
    by its upper blocks, and the unrefined solves still equal the dense ones (the large
    stages that take them by default are few in the suite)."""
    from tallskinny.testing import large_stage_paths

    modules, loss, X, y = make_case(name, 1)
    chain = ts.Chain(modules, loss)
    H = dense_hessian(chain, X, y) if kind == "hessian" else dense_ggn(chain, X, y)
    P = H.shape[0]
    B = torch.randn(P, 3, generator=torch.Generator().manual_seed(2))
    with large_stage_paths():
        x = chain.curvature(X, y, kind=kind, method="riccati").factorize(0.3).solve(B, refine=0)
    M = H + 0.3 * torch.eye(P)
    assert rel(x, torch.linalg.solve(M, B)) <= 1e-13 * float(torch.linalg.cond(M))


def test_from_sequential_and_call():
    modules, loss, X, y = make_case("silu", 2)
    seq = torch.nn.Sequential(*modules)
    chain = ts.Chain.from_sequential(seq, loss)
    assert [id(p) for p in chain.parameters()] == [id(p) for p in seq.parameters()]
    torch.testing.assert_close(chain(X, y), loss(seq(X), y), rtol=0, atol=0)
    curv = chain.curvature(X, y)
    torch.testing.assert_close(curv.loss, loss(seq(X), y).detach(), rtol=1e-14, atol=0)


def test_analytic_and_fallback_chains_agree():
    """The same network with every module forced through torch.func gives the same H."""
    modules, loss, X, y = make_case("tanh", 1)
    chain = ts.Chain(modules, loss)
    fallback = ts.Chain([ts.blocks.FuncBlock(m) for m in modules], ts.blocks.FuncLoss(loss))
    a, b = chain.curvature(X, y), fallback.curvature(X, y)
    torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-12, atol=1e-13)
    P = a.num_parameters
    rhs = torch.randn(P, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.solve(rhs, 1e-3), b.solve(rhs, 1e-3), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_single_vector_products_match_dense(bias, batch, kind):
    """HVPs of one vector take nn.Linear's view-based product path, of several the general
    one: both equal the dense matrix."""
    torch.manual_seed(batch)
    modules = [torch.nn.Linear(3, 4, bias=bias), torch.nn.Tanh(), torch.nn.Linear(4, 2, bias=bias)]
    chain = ts.Chain(modules, torch.nn.CrossEntropyLoss())
    X = torch.randn(batch, 3)
    y = torch.randint(0, 2, (batch,))
    curv = chain.curvature(X, y, kind=kind)
    H = (dense_hessian if kind == "hessian" else dense_ggn)(chain, X, y)
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(curv.hvp(V[:, 0]), H @ V[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(curv.hvp(V), H @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name, z0",
    [("tanh", 20.0), ("sigmoid", 40.0), ("gelu", -7.4), ("gelu-tanh", -9.0), ("gelu", -30.0)],
)
def test_saturated_unit_gradient_and_hessian_exact(name, z0):
    """``Linear(1, 1) → σ → Linear(1, 1)``, squared error, the unit saturated at ``z0``:
    every entry of the gradient and the Hessian (4 parameters) to 1e-12 relative
    against mpmath. The
    adjoints are the blocks' own (torch's backward formulas ``1 − t²``, ``s(1 − s)``,
    ``1 + erf`` give ``σ' = 0`` or lose the digits there) and so is GELU's value (torch's
    ``z(1 + erf)/2`` is 3e-4 relative off at −7.4 and 0 at −30, which the second Linear's
    ``G`` would inherit)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 250  # (the entries at −30 are 1e-194: numerical differentiation needs the digits)
    c = mp.sqrt(2 / mp.pi)
    exact = {
        "tanh": mp.tanh,
        "sigmoid": lambda t: 1 / (1 + mp.exp(-t)),
        "gelu": lambda t: t * mp.erfc(-t / mp.sqrt(2)) / 2,
        "gelu-tanh": lambda t: t * (1 + mp.tanh(c * (t + mp.mpf("0.044715") * t**3))) / 2,
    }[name]
    module = {
        "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "gelu-tanh": nn.GELU(approximate="tanh"),
    }[name]
    theta = [0.5, z0 - 0.5, 3.0, 0.1]  # w1, b1, w2, b2; x = 1, target 1
    lin1, lin2 = nn.Linear(1, 1).double(), nn.Linear(1, 1).double()
    with torch.no_grad():
        for p, v in zip([lin1.weight, lin1.bias, lin2.weight, lin2.bias], theta):
            p.fill_(v)
    chain = ts.Chain([lin1, module, lin2], nn.MSELoss())
    X, y = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)

    def loss(w1, b1, w2, b2):
        return (w2 * exact(w1 + b1) + b2 - 1) ** 2

    point = [mp.mpf(v) for v in theta]
    unit = [tuple(int(i == j) for i in range(4)) for j in range(4)]
    grad = torch.tensor([float(mp.diff(loss, point, u)) for u in unit], dtype=torch.float64)
    hess = torch.tensor(
        [[float(mp.diff(loss, point, tuple(a + b for a, b in zip(u, v)))) for v in unit] for u in unit],
        dtype=torch.float64,
    )
    curv = chain.curvature(X, y)
    # entrywise: the first layer's entries carry σ'(z0) ~ 1e-17 and would vanish in a norm
    # (1e-250 absolute: at −30, ∂²/∂w2² = 2·gelu(−30)² underflows, and mpmath's numerical
    # derivative of it is 1e-264 of noise)
    assert bool(((curv.gradient() - grad).abs() <= 1e-12 * grad.abs()).all())
    H = curv.hvp(torch.eye(4, dtype=torch.float64))
    assert bool(((H - hess).abs() <= 1e-12 * hess.abs() + 1e-250).all())
