"""Influence scores and the Laplace evidence against dense torch.func references."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

import tallskinny as ts
from reference_models import DenseModel, chain_of, small_model
from tallskinny.influence import influence
from tallskinny.laplace import Laplace


def data(n, d_in=3, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)


# -- influence ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_influence_equals_dense(kind, reduction):
    model = small_model()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    chain, dense = chain_of(model, loss), DenseModel(model, loss)
    (Xtr, ytr), (Xte, yte) = data(6), data(3, seed=2)
    damping = 0.05
    scores = influence(chain, (Xtr, ytr), (Xte, yte), damping=damping, kind=kind)
    H = dense.hessian(Xtr, ytr) if kind == "hessian" else dense.ggn(Xtr, ytr)
    H_damped = H + damping * torch.eye(len(H))
    expected = -dense.per_example_gradients(Xte, yte) @ torch.linalg.solve(H_damped, dense.per_example_gradients(Xtr, ytr).T)
    assert scores.shape == (3, 6)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    if kind == "hessian":
        assert int((torch.linalg.eigvalsh(H_damped) < 0).sum()) > 0  # the indefinite case is covered


def test_influence_predicts_leave_one_out_to_first_order():
    """Removing example i changes the minimiser of (mean loss + ½ε‖θ‖²) by ≈ H⁻¹∇ℓ_i / n."""
    model = small_model(seed=3)
    loss = nn.CrossEntropyLoss()
    chain, dense = chain_of(model, loss), DenseModel(model, loss)
    (Xtr, ytr), (Xte, yte) = data(6), data(2, seed=2)
    damping = 0.5
    scores = influence(chain, (Xtr, ytr), (Xte, yte), damping=damping)
    # the influence scores are directional derivatives: check one by finite differences
    # of the regularised minimiser around θ (θ is not a minimiser here, so differentiate
    # the Newton step instead: d/dw of θ(w) at w=0 for the weighted objective)
    g_tr = dense.per_example_gradients(Xtr, ytr)
    H = dense.hessian(Xtr, ytr) + damping * torch.eye(len(dense.theta))
    dtheta = -torch.linalg.solve(H, g_tr[0])
    g_te = dense.per_example_gradients(Xte, yte)
    torch.testing.assert_close(scores[:, 0], g_te @ dtheta, rtol=1e-8, atol=0.0)


def test_influence_errors():
    model = small_model()
    chain = chain_of(model, nn.CrossEntropyLoss())
    X, y = data(4)
    with pytest.raises(ValueError, match="damping"):
        influence(chain, (X, y), (X, y), damping=-1.0)
    with pytest.raises(ValueError, match="kind"):
        influence(chain, (X, y), (X, y), damping=1.0, kind="fisher")
    with pytest.raises(ValueError, match="same number of examples"):
        influence(chain, (X, y[:3]), (X, y), damping=1.0)
    with pytest.raises(TypeError, match="pair"):
        influence(chain, X, (X, y), damping=1.0)


# -- Laplace --------------------------------------------------------------------------------
def dense_log_evidence(dense: DenseModel, X, y, alpha, scale, offset):
    G = scale * dense.ggn(X, y)
    P = len(dense.theta)
    nll = scale * float(dense.loss_at(dense.theta, X, y)) + offset
    sign, logdet = torch.linalg.slogdet(G + alpha * torch.eye(P))
    assert sign > 0
    return -nll - 0.5 * alpha * float(dense.theta @ dense.theta) + 0.5 * P * math.log(alpha) - 0.5 * float(logdet)


@pytest.mark.parametrize(
    "loss,scale,offset",
    [
        (nn.CrossEntropyLoss(), 8.0, 0.0),
        (nn.CrossEntropyLoss(reduction="sum"), 1.0, 0.0),
        (nn.MSELoss(), 0.5 * 8 * 3, 0.5 * 8 * 3 * math.log(2 * math.pi)),
        (nn.MSELoss(reduction="sum"), 0.5, 0.5 * 8 * 3 * math.log(2 * math.pi)),
    ],
)
@pytest.mark.parametrize("alpha", [1e-3, 1.0, 30.0])
def test_log_evidence_equals_dense(loss, scale, offset, alpha):
    model = small_model(seed=4)
    X, y = data(8)
    if isinstance(loss, nn.MSELoss):
        y = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    chain, dense = chain_of(model, loss), DenseModel(model, loss)
    lap = Laplace(chain, X, y)
    assert lap.nll_scale == scale
    expected = dense_log_evidence(dense, X, y, alpha, scale, offset)
    assert abs(lap.log_marginal_likelihood(alpha) - expected) <= 1e-8 * abs(expected)


def test_prior_precision_optimum_matches_dense():
    model = small_model(seed=6)
    X, y = data(10)
    loss = nn.CrossEntropyLoss()
    chain, dense = chain_of(model, loss), DenseModel(model, loss)
    lap = Laplace(chain, X, y)
    alpha = lap.optimize_prior_precision(1e-4, 1e4, tol=1e-8)
    best = minimize_scalar(
        lambda la: -dense_log_evidence(dense, X, y, math.exp(la), 10.0, 0.0),
        bounds=(math.log(1e-4), math.log(1e4)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert abs(math.log(alpha) - best.x) <= 1e-5
    assert lap.prior_precision == alpha
    assert 1e-4 < alpha < 1e4  # an interior optimum: the test checks a real maximiser


def test_predictive_covariance_equals_dense():
    model = small_model(seed=7)
    X, y = data(8)
    Xte, _ = data(3, seed=9)
    loss = nn.CrossEntropyLoss()
    chain, dense = chain_of(model, loss), DenseModel(model, loss)
    lap = Laplace(chain, X, y)
    alpha = 0.7
    cov = lap.predictive_covariance(Xte, alpha)
    Lam = 8.0 * dense.ggn(X, y) + alpha * torch.eye(len(dense.theta))
    J = dense.output_jacobian(Xte)
    expected = torch.einsum("idp,pq,ieq->ide", J, torch.linalg.inv(Lam), J)
    torch.testing.assert_close(cov, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(lap.predictive_variance(Xte, alpha), torch.diagonal(expected, dim1=-2, dim2=-1), rtol=1e-8, atol=1e-12)


def test_laplace_errors():
    model = small_model()
    X, y = data(4)
    with pytest.raises(ValueError, match="nll_scale"):
        Laplace(chain_of(model, nn.CrossEntropyLoss(label_smoothing=0.1)), X, y)
    with pytest.raises(ValueError, match="nll_scale"):
        Laplace(chain_of(model, lambda z, t: (z**2).sum()), X, y)
    lap = Laplace(chain_of(model, nn.CrossEntropyLoss()), X, y)
    with pytest.raises(ValueError, match="prior_precision"):
        lap.log_marginal_likelihood()
    with pytest.raises(ValueError, match="> 0"):
        lap.log_marginal_likelihood(0.0)
    with pytest.raises(ValueError, match="lower < upper"):
        lap.optimize_prior_precision(10.0, 1.0)


def test_non_finite_test_example_is_named():
    """A test example with NaN gives a NaN gradient: refused before the solve, naming it
    (not blamed on H + εI)."""
    chain = chain_of(small_model(), nn.CrossEntropyLoss())
    (X, y), (Xte, yte) = data(4), data(3, seed=2)
    Xte[1, 0] = math.nan
    with pytest.raises(ValueError, match="test example 1 contains NaN or inf"):
        influence(chain, (X, y), (Xte, yte), damping=0.1)


def test_laplace_after_training_is_stale():
    model = small_model()
    X, y = data(4)
    lap = Laplace(chain_of(model, nn.CrossEntropyLoss()), X, y)
    lap.log_marginal_likelihood(1.0)
    with torch.no_grad():
        next(model.parameters()).add_(0.1)  # trained further: the GGN is not the model's any more
    for call in (lambda: lap.log_marginal_likelihood(1.0), lambda: lap.predictive_variance(X, 1.0)):
        with pytest.raises(ts.StaleCurvatureError):
            call()


def test_laplace_non_finite_inputs_are_named():
    X, y = data(4)
    lap = Laplace(chain_of(small_model(), nn.CrossEntropyLoss()), X, y)
    Xte, _ = data(2, seed=3)
    Xte[0, 1] = math.inf
    with pytest.raises(ValueError, match="output Jacobian at inputs contains NaN or inf"):
        lap.predictive_covariance(Xte, 1.0)


# -- data sets and routes -------------------------------------------------------------------
def _loader(X, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)


@pytest.mark.parametrize("method", ["riccati", "kernel", "dense"])
def test_laplace_from_a_loader_equals_the_whole_batch(method):
    model = small_model(seed=11)
    X, y = data(10)
    chain = chain_of(model, nn.CrossEntropyLoss())
    whole = Laplace(chain, X, y, method="riccati")
    lap = Laplace(chain, _loader(X, y, 4), method=method)  # batches 4, 4, 2
    assert lap.curvature.method == method
    for alpha in (1e-3, 0.3, 5.0, 40.0):
        a, b = lap.log_marginal_likelihood(alpha), whole.log_marginal_likelihood(alpha)
        assert abs(a - b) <= 1e-10 * abs(b)


def test_influence_from_loaders_equals_tensors():
    model = small_model(seed=12)
    chain = chain_of(model, nn.CrossEntropyLoss())
    (Xtr, ytr), (Xte, yte) = data(7), data(3, seed=2)
    a = influence(chain, (Xtr, ytr), (Xte, yte), damping=0.1, kind="ggn")
    b = influence(chain, _loader(Xtr, ytr, 3), _loader(Xte, yte, 2), damping=0.1, kind="ggn")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_predictive_probabilities_probit_and_monte_carlo():
    model = small_model(seed=13)
    X, y = data(8)
    Xte, _ = data(4, seed=9)
    chain, dense = chain_of(model, nn.CrossEntropyLoss()), DenseModel(model, nn.CrossEntropyLoss())
    lap = Laplace(chain, X, y)
    cov = lap.predictive_covariance(Xte, 0.5)
    f = dense.output(dense.theta, Xte).detach()
    probit = lap.predictive_probabilities(Xte, 0.5, link="probit")
    expected = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * torch.diagonal(cov, dim1=-2, dim2=-1)), dim=-1)
    torch.testing.assert_close(probit, expected, rtol=1e-12, atol=1e-14)
    mc = lap.predictive_probabilities(Xte, 0.5, link="mc", samples=20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc.sum(-1), torch.ones(4))
    draws = torch.distributions.MultivariateNormal(f, cov + 1e-12 * torch.eye(cov.shape[-1])).sample(
        (20000,)
    )
    assert float((mc - torch.softmax(draws, -1).mean(0)).abs().max()) < 0.01  # two Monte Carlo estimates
    with pytest.raises(ValueError, match="link"):
        lap.predictive_probabilities(Xte, 0.5, link="logit")
