"""The krylov route (inexact, opt-in): CG and MINRES against dense references."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import routes
from tallskinny.routes import krylov
from tallskinny.testing import dense_ggn, dense_hessian

pytestmark = pytest.mark.usefixtures("float64")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spectrum_matrix(eigenvalues, seed=0):
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed)))
    return Q @ torch.diag(eigenvalues) @ Q.mT, Q


def rel_residual(A, x, b):
    return (b - A @ x).norm(dim=0) / b.norm(dim=0)


# -- the two methods on plain matrices ----------------------------------------------------
@pytest.mark.parametrize("method", [krylov.conjugate_gradient, krylov.minres])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_methods_on_spd_matrices(method, preconditioned):
    lam = torch.logspace(-3, 1, 50)
    A, Q = spectrum_matrix(lam)
    b = torch.randn(50, 3, generator=gen(1))
    b[:, 1] = 0.0  # a zero column: zero solution, no work for it
    pre = None
    if preconditioned:  # an SPD approximation of A⁻¹ (its spectrum within a factor 2)
        scale = 1 + torch.rand(50, generator=gen(2))
        M = Q @ torch.diag(1 / (lam * scale)) @ Q.mT
        pre = lambda r: M @ r  # noqa: E731
    x, products, note = method(lambda v: A @ v, b, rtol=1e-10, maxiter=500, precondition=pre)
    assert note is None
    assert torch.equal(x[:, 1], torch.zeros(50))
    ref = torch.linalg.solve(A, b[:, [0, 2]])
    assert float(rel_residual(A, x[:, [0, 2]], b[:, [0, 2]]).max()) <= 2e-10
    assert float((x[:, [0, 2]] - ref).norm() / ref.norm()) <= 1e-10 * 1e4
    if preconditioned:
        assert products <= 30  # cond(M A) ≤ 2: a few tens of steps, not 100s


@pytest.mark.parametrize("preconditioned", [False, True])
def test_minres_on_indefinite_matrices(preconditioned):
    lam = torch.cat([-torch.logspace(-2, 1, 20), torch.logspace(-2, 1, 40)])
    A, Q = spectrum_matrix(lam, seed=3)
    b = torch.randn(60, 2, generator=gen(4))
    pre = (lambda r: Q @ ((Q.mT @ r) / lam.abs().unsqueeze(1))) if preconditioned else None
    x, products, _ = krylov.minres(lambda v: A @ v, b, rtol=1e-10, maxiter=1000, precondition=pre)
    assert float(rel_residual(A, x, b).max()) <= 2e-10
    if preconditioned:  # |A|⁻¹: M A has eigenvalues ±1, MINRES ends in two steps
        assert products <= 3


def test_cg_stops_at_maxiter():
    A, _ = spectrum_matrix(torch.logspace(-3, 1, 40))
    b = torch.randn(40, 1, generator=gen(5))
    x, products, _ = krylov.conjugate_gradient(lambda v: A @ v, b, rtol=1e-12, maxiter=3)
    assert products == 3 and float(rel_residual(A, x, b)) > 1e-3


# -- the route on chains --------------------------------------------------------------------
def small_chain(loss=None, seed=0):
    torch.manual_seed(seed)
    return ts.Chain([nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)], loss or nn.CrossEntropyLoss())


def samples(n, seed=1):
    g = gen(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


REFERENCES = {"ggn": dense_ggn, "hessian": dense_hessian}


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("preconditioner", ["batch", "ggn", "none"])
@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_solve_matches_dense_reference(kind, preconditioner, damping):
    chain = small_chain()
    X, y = samples(40)
    M = REFERENCES[kind](chain, X, y)
    P = M.shape[0]
    M = M + damping * torch.eye(P)
    eig = torch.linalg.eigvalsh(M)
    if kind == "hessian":
        assert float(eig.min()) < 0 or damping == 1.0  # indefinite at the small damping
    cond = float(eig.abs().max() / eig.abs().min())
    b = torch.randn(P, 3, generator=gen(2))
    rtol = 1e-9
    options = routes.Krylov(rtol=rtol, maxiter=5000, preconditioner=preconditioner, preconditioner_batch=8)
    curv = chain.curvature(X, y, kind=kind, method=options)
    assert curv.method == "krylov"
    fact = curv.factorize(damping)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ts.ConvergenceWarning)
        x = fact.solve(b)
    info = fact.info
    assert info.converged and info.residual <= rtol
    assert info.method == ("cg" if kind == "ggn" else "minres")
    assert info.preconditioned == (preconditioner != "none")
    true = float(rel_residual(M, x, b).max())
    assert true <= 1.01 * rtol  # the residual reported is the true one
    assert abs(true - info.residual) <= 1e-3 * rtol + 1e-15
    ref = torch.linalg.solve(M, b)
    assert float((x - ref).norm() / ref.norm()) <= cond * rtol
    # hvp is the exact product on every route
    assert float((curv.hvp(b) - (M - damping * torch.eye(P)) @ b).norm() / (M @ b).norm()) <= 1e-12


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_loader_and_inverse_hvp_match_one_batch(kind):
    chain = small_chain()
    X, y = samples(23, seed=7)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)  # 8, 8, 7
    M = REFERENCES[kind](chain, X, y) + 0.1 * torch.eye(75)
    b = torch.randn(75, generator=gen(3))
    options = routes.Krylov(rtol=1e-10, maxiter=2000)
    x_loader = chain.curvature(loader, kind=kind, method=options).solve(b, 0.1)
    x_batch = chain.inverse_hvp(X, y, b, 0.1, kind=kind, method=options)
    ref = torch.linalg.solve(M, b)
    for x in (x_loader, x_batch):
        assert x.shape == b.shape
        assert float((b - M @ x).norm() / b.norm()) <= 1.01e-10
        assert float((x - ref).norm() / ref.norm()) <= 1e-7


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_float32(kind):
    chain = small_chain()
    chain32 = ts.Chain([m.float() for m in small_chain().modules], nn.CrossEntropyLoss())
    X, y = samples(30)
    M = REFERENCES[kind](chain, X, y) + 0.5 * torch.eye(75)
    b = torch.randn(75, generator=gen(4))
    curv = chain32.curvature(X.float(), y, kind=kind, method="krylov")
    fact = curv.factorize(0.5)
    x = fact.solve(b.float())
    assert x.dtype == torch.float32
    rtol = fact.info.rtol
    assert rtol == pytest.approx(1000 * torch.finfo(torch.float32).eps)
    assert fact.info.converged
    assert float((b - M @ x.double()).norm() / b.norm()) <= 2 * rtol


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_non_convergence_warns_and_returns_the_iterate(kind):
    chain = small_chain()
    X, y = samples(40)
    curv = chain.curvature(X, y, kind=kind, method=routes.Krylov(maxiter=1, preconditioner="none"))
    b = torch.randn(75, generator=gen(5))
    fact = curv.factorize(1e-3)
    with pytest.warns(ts.ConvergenceWarning, match="did not converge"):
        x = fact.solve(b)
    assert isinstance(fact.info, routes.KrylovInfo)
    assert not fact.info.converged and fact.info.residual > fact.info.rtol
    assert fact.info.iterations == 1 and fact.info.products == 2  # one step, one residual check
    assert torch.isfinite(x).all() and float(x.norm()) > 0
    assert issubclass(ts.ConvergenceWarning, ts.AccuracyWarning)


def test_exact_preconditioner_converges_at_once_and_a_sub_batch_helps():
    chain = small_chain()
    X, y = samples(64, seed=11)
    b = torch.randn(75, generator=gen(6))

    def products(**kw):
        fact = chain.curvature(X, y, kind="ggn", method=routes.Krylov(rtol=1e-10, **kw)).factorize(1e-3)
        fact.solve(b)
        assert fact.info.converged
        return fact.info.products

    plain = products(preconditioner="none")
    # the whole batch as "sub-batch": the preconditioner is (G + εI)⁻¹ itself
    assert products(preconditioner_batch=64) <= 3
    # half the samples: a real, if inexact, preconditioner; far fewer products than none
    assert products(preconditioner_batch=32) <= 0.7 * plain


def test_sum_reduction_scales_the_preconditioner():
    chain = ts.Chain([nn.Linear(5, 3)], nn.MSELoss(reduction="sum"))
    X = torch.randn(20, 5, generator=gen(8))
    y = torch.randn(20, 3, generator=gen(9))
    _, scale = krylov.preconditioner_curvature(chain, X, y, "ggn", routes.Krylov(preconditioner_batch=5), None)
    assert scale == 4.0
    mean = ts.Chain([nn.Linear(5, 3)], nn.MSELoss())
    _, scale = krylov.preconditioner_curvature(mean, X, y, "ggn", routes.Krylov(preconditioner_batch=5), None)
    assert scale == 1.0
    # a linear model with MSE: the GGN is XᵀX ⊗ I, so (N/n)·G_n is close to G: few products
    b = torch.randn(18, generator=gen(10))
    fact = chain.curvature(X, y, kind="ggn", method=routes.Krylov(rtol=1e-10, preconditioner_batch=5)).factorize(1e-3)
    fact.solve(b)
    assert fact.info.converged


def test_spectral_quantities_are_refused_by_name():
    chain = small_chain()
    X, y = samples(10)
    fact = chain.curvature(X, y, kind="hessian", method="krylov").factorize(0.1)
    for call in (fact.logdet, fact.sign, fact.inertia, fact.is_positive_definite):
        with pytest.raises(ts.UnsupportedOnRouteError, match="krylov route") as err:
            call()
        assert err.value.route == "krylov"


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(rtol=0.0), "rtol"), (dict(rtol=1.5), "rtol"), (dict(rtol="1e-8"), "rtol"),
        (dict(maxiter=0), "maxiter"), (dict(maxiter=2.5), "maxiter"), (dict(maxiter=True), "maxiter"),
        (dict(preconditioner="jacobi"), "preconditioner must be"), (dict(preconditioner_batch=0), "preconditioner_batch"),
    ],
)
def test_bad_options_are_named_before_any_work(options, match):
    with pytest.raises(ValueError, match=match):
        routes.Krylov(**options)


def test_bad_method_names_before_any_work():
    chain = small_chain()
    X, y = samples(4)
    with pytest.raises(ValueError, match="method must be one of"):
        chain.curvature(X, y, method="Krylov")
    with pytest.raises(ValueError, match="method must be one of"):
        chain.inverse_hvp(X, y, torch.zeros(75), 1.0, method="cg")


def test_method_explain_and_auto():
    chain = small_chain()
    X, y = samples(12)
    curv = chain.curvature(X, y, kind="ggn", method="krylov")
    assert curv.method == "krylov"
    text = curv.explain()
    assert "krylov" in text and "asked for" in text and "not estimated" in text
    for kind in ("ggn", "hessian"):
        assert chain.curvature(X, y, kind=kind).method != "krylov"
    assert "krylov" in routes.METHODS and "krylov" not in routes.ROUTES
    # exact routes give no info
    assert chain.curvature(X, y, kind="ggn").factorize(0.1).info is None


def test_user_tensors_and_parameters_untouched():
    chain = small_chain()
    X, y = samples(20)
    b = torch.randn(75, 2, generator=gen(12))
    copies = [t.clone() for t in (X, y, b)]
    params = [p.detach().clone() for p in chain.parameters()]
    x = chain.inverse_hvp(X, y, b, 0.1, kind="hessian", method=routes.Krylov(preconditioner_batch=5))
    x2 = chain.curvature(X, y, kind="ggn", method="krylov").solve(b, 0.1)
    assert all(torch.equal(t, c) for t, c in zip((X, y, b), copies))
    assert all(torch.equal(p, q) for p, q in zip(chain.parameters(), params))
    assert x.data_ptr() != b.data_ptr() and x2.data_ptr() != b.data_ptr()


def test_per_parameter_format():
    chain = small_chain()
    X, y = samples(20)
    b = [torch.randn(p.shape, generator=gen(13)) for p in chain.parameters()]
    x = chain.curvature(X, y, kind="ggn", method="krylov").solve(b, 0.1)
    assert [t.shape for t in x] == [t.shape for t in b]


def test_bench_runs_on_a_tiny_problem(capsys):
    pytest.importorskip("sklearn")
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "krylov.py"
    spec = importlib.util.spec_from_file_location("bench_krylov", path)
    module = importlib.util.module_from_spec(spec)
    previous = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        assert module.main(["--samples", "40", "--width", "6", "--batch", "8", "--maxiter", "40",
                            "--dampings", "0.1"]) == 0
    finally:
        torch.set_num_threads(previous)
        sys.path[:] = [p for p in sys.path if not p.endswith("bench")]
    out = capsys.readouterr().out
    assert out.count("| trained |") == 2 and out.count("| init |") == 2
