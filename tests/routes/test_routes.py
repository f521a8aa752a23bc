"""Every route (riccati, kernel, dense) against dense references, the planner, data sets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import elimination, routes
from tallskinny.routes import kernel as kernel_module
from tallskinny.testing import dense_ggn, dense_hessian

pytestmark = pytest.mark.usefixtures("float64")


def mlp(widths, act=nn.Tanh, bias=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return layers


def data(n, d, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


CASES = {
    "tanh-ce": lambda: (ts.Chain(mlp([5, 6, 6, 3]), nn.CrossEntropyLoss()), *data(4, 5, 3)),
    "relu-mse-sum": lambda: (
        ts.Chain(mlp([4, 7, 2], nn.ReLU, bias=False), nn.MSELoss(reduction="sum")),
        torch.randn(3, 4, generator=torch.Generator().manual_seed(2)),
        torch.randn(3, 2, generator=torch.Generator().manual_seed(3)),
    ),
    "layernorm": lambda: (
        ts.Chain([nn.Linear(3, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 3)], nn.CrossEntropyLoss(label_smoothing=0.1)),
        *data(5, 3, 3),
    ),
    "more-outputs-than-parameters": lambda: (ts.Chain([nn.Linear(2, 2, bias=False)], nn.CrossEntropyLoss()), *data(6, 2, 2)),
}


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind, method", [("ggn", "riccati"), ("ggn", "kernel"), ("ggn", "dense"),
                                          ("hessian", "riccati"), ("hessian", "dense")])
def test_route_matches_dense_references(case, kind, method):
    chain, X, y = CASES[case]()
    H = (dense_ggn if kind == "ggn" else dense_hessian)(chain, X, y)
    P = H.shape[0]
    curv = chain.curvature(X, y, kind=kind, method=method)
    assert curv.method == method
    B = torch.randn(P, 3, generator=torch.Generator().manual_seed(4))
    assert rel(curv.hvp(B), H @ B) <= 1e-12
    for damping in (1e-6, 1e-3, 0.5, 10.0, 1e-2):  # five: the kernel's Cholesky, then its eigh
        M = H + damping * torch.eye(P)
        eig = torch.linalg.eigvalsh(M)
        cond = float(eig.abs().max() / eig.abs().min())
        fact = curv.factorize(damping)
        assert rel(fact.solve(B), torch.linalg.solve(M, B)) <= max(1e-9, 64 * 2.2e-16 * cond)
        logdet = float(eig.abs().log().sum())
        assert abs(float(fact.logdet()) - logdet) <= 1e-9 * max(1.0, abs(logdet)) + 1e-13 * P * cond
        assert tuple(fact.inertia()) == (int((eig > 0).sum()), int((eig < 0).sum()), 0)
        assert float(fact.sign()) == (-1.0) ** int((eig < 0).sum())


def test_kernel_per_sample_and_explicit_paths_agree(monkeypatch):
    chain, X, y = CASES["tanh-ce"]()
    fast = chain.curvature(X, y, kind="ggn", method="kernel")
    x_fast = fast.solve(torch.ones(fast.num_parameters), 1e-3)
    assert fast._spectral_route().W is None  # the per-sample kernel: no P-sized columns
    monkeypatch.setattr(kernel_module, "per_sample_kernel", lambda *a, **k: None)
    slow = chain.curvature(X, y, kind="ggn", method="kernel")
    x_slow = slow.solve(torch.ones(slow.num_parameters), 1e-3)
    assert slow._spectral_route().W is not None
    assert rel(x_fast, x_slow) <= 1e-12
    assert torch.allclose(fast._spectral_route().K, slow._spectral_route().K, rtol=1e-12, atol=1e-15)


def test_kernel_at_zero_damping():
    chain, X, y = CASES["tanh-ce"]()  # P = 87 > 4·3 outputs: G is singular
    with pytest.raises(ts.SingularSystemError):
        chain.curvature(X, y, kind="ggn", method="kernel").factorize(0.0)
    chain = ts.Chain([nn.Linear(2, 2, bias=False)], nn.MSELoss())  # 12 outputs, P = 4: G regular
    X = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(6))
    G = dense_ggn(chain, X, y)
    b = torch.randn(4, generator=torch.Generator().manual_seed(0))
    x = chain.curvature(X, y, kind="ggn", method="kernel").solve(b, 0.0)
    assert rel(x, torch.linalg.solve(G, b)) <= 1e-10


def test_method_is_checked_before_any_work():
    chain, X, y = CASES["tanh-ce"]()
    with pytest.raises(ValueError, match="method must be one of"):
        chain.curvature(X, y, method="cg")
    with pytest.raises(ValueError, match="Gauss–Newton only"):
        chain.curvature(X, y, kind="hessian", method="kernel")
    with pytest.raises(ValueError, match="method must be one of"):
        chain.inverse_hvp(X, y, torch.zeros(87), 1.0, method="krylov ")


def test_auto_picks_by_shape_and_says_why():
    chain, X, y = CASES["tanh-ce"]()
    curv = chain.curvature(X, y, kind="ggn")
    assert curv.method in routes.ROUTES
    text = curv.explain()
    assert "chosen" in text and all(r in text for r in routes.ROUTES)
    # wide batch, many parameters: the kernel; one sample: the elimination; N·c ≫ P: dense
    deep = [(32, 32, 1056), (32, 32, 0)] * 15 + [(32, 10, 330)]

    def pick(samples, sizes, kind="ggn"):
        scaled = [(a * samples, b * samples, p) for a, b, p in sizes]
        return routes.choose(routes.route_costs(scaled, 10 * samples, samples, kind, 8), None)[0]

    assert pick(32, deep) == "kernel"
    assert pick(1, deep) == "riccati"
    assert pick(1000, [(64, 16, 1040), (16, 16, 0), (16, 10, 170)]) == "dense"
    assert pick(32, deep, kind="hessian") == "riccati"


def test_a_loader_is_the_curvature_of_all_its_samples():
    chain, _, _ = CASES["tanh-ce"]()
    X, y = data(11, 5, 3, seed=7)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)  # 4, 4, 3
    for kind in ("hessian", "ggn"):
        one = chain.curvature(X, y, kind=kind)
        many = chain.curvature(loader, kind=kind)
        assert torch.equal(one.to_dense(), many.to_dense())
        b = torch.randn(one.num_parameters, generator=torch.Generator().manual_seed(0))
        assert rel(many.solve(b, 1e-2), one.solve(b, 1e-2)) <= 1e-12
    with pytest.raises(TypeError, match="pair"):
        chain.curvature([X], kind="ggn")
    with pytest.raises(ValueError, match="no batches"):
        chain.curvature([], kind="ggn")
    with pytest.raises(TypeError, match="beside"):
        chain.curvature(loader, y)


@pytest.mark.parametrize("case", ["tanh-ce", "relu-mse-sum"])
def test_per_sample_factor_equals_the_adjoint_sweep(case):
    # W = Jᵀ B by the per-sample sweep (no N·c-wide dense adjoints) against the explicit sweep
    chain, X, y = CASES[case]()
    curv = chain.curvature(X, y, kind="ggn", method="dense")
    blocks = elimination.compile_oracles(curv.oracles)
    E = curv.loss_oracle.E.to_dense()
    B_s = routes.loss_factor_blocks(E, X.shape[0])
    W = routes.per_sample_factor(blocks, curv.oracles, B_s, curv.num_parameters)
    assert W is not None
    reference = routes.adjoint(blocks, routes.output_loss_factor(E, X.shape[0]), curv.num_parameters)
    assert rel(W, reference) < 1e-13


def test_kernel_checks_its_solves_with_its_kept_factor(monkeypatch):
    """Where ``W`` is kept, the solve's backward-error check applies ``W Wᵀ + εI`` (two
    GEMMs) instead of a sweep through the blocks; the product is ``G`` to rounding, the
    lower bound of ``‖G‖`` from ``K`` is one, and the solves stay exact."""
    monkeypatch.setattr(kernel_module, "per_sample_kernel", lambda *a, **k: None)  # W kept
    chain, X, y = CASES["layernorm"]()
    G = dense_ggn(chain, X, y)
    P = G.shape[0]
    curv = chain.curvature(X, y, kind="ggn", method="kernel")
    kernel = curv._spectral_route()
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(7))
    assert rel(kernel.gram_apply(V, 0.3), G @ V + 0.3 * V) <= 1e-13
    assert 0.0 < kernel.norm_lower_bound() <= float(torch.linalg.matrix_norm(G, 2)) * (1 + 1e-12)
    monkeypatch.setattr(type(curv), "_apply", lambda *a, **k: pytest.fail("a sweep where W is kept"))
    for damping in (1e-6, 1e-2):  # the Cholesky factorizations
        fact = curv.factorize(damping)
        assert fact._inner.apply(V) is not None
        x = fact.solve(V[:, 0])
        assert rel(x, torch.linalg.solve(G + damping * torch.eye(P), V[:, 0])) <= 1e-9


def test_the_per_sample_kernel_keeps_no_factor_and_checks_by_sweeps():
    chain, X, y = CASES["tanh-ce"]()
    curv = chain.curvature(X, y, kind="ggn", method="kernel")
    fact = curv.factorize(1e-3)
    assert curv._spectral_route().W is None and fact._inner.apply(torch.ones(curv.num_parameters, 1)) is None
    b = torch.ones(curv.num_parameters)
    G = dense_ggn(chain, X, y)
    assert rel(fact.solve(b), torch.linalg.solve(G + 1e-3 * torch.eye(G.shape[0]), b)) <= 1e-9
