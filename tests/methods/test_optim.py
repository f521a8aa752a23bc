"""The exact optimizers: each step equals the dense computation; training decreases the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dense_reference import trust_region_reference
from reference_models import DenseModel, chain_of, small_model
from tallskinny.optim import DampedNewton, StepReport, TrustRegion


def setup(seed=0, act=nn.Tanh, n=6):
    model = small_model(act=act, seed=seed)
    loss = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed + 100)
    X, y = torch.randn(n, 3, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return model, chain_of(model, loss), DenseModel(model, loss), X, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_damped_newton_step_equals_dense(kind):
    model, chain, dense, X, y = setup(seed=1)
    H = dense.ggn(X, y) if kind == "ggn" else dense.hessian(X, y)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    damping = max(1.0, -2 * lam_min)
    opt = DampedNewton(chain, kind=kind, damping=damping, adaptive=False)
    before = flat(model)
    loss = opt.step((X, y))
    assert abs(float(loss) - float(dense.loss_at(before, X, y))) <= 1e-12
    report = opt.last_step
    assert isinstance(report, StepReport) and report.accepted and report.factorizations == 1
    expected = -torch.linalg.solve(H + damping * torch.eye(len(H)), dense.gradient(X, y))
    torch.testing.assert_close(flat(model) - before, expected, rtol=1e-9, atol=1e-13)
    assert abs(report.new_loss - float(dense.loss_at(flat(model), X, y))) <= 1e-12


def test_damped_newton_on_an_indefinite_hessian_raises_the_damping_until_positive_definite():
    model, chain, dense, X, y = setup(seed=2)
    H = dense.hessian(X, y)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    assert lam_min < -1e-3
    opt = DampedNewton(chain, kind="hessian", damping=1e-3 * -lam_min, adaptive=False)
    opt.step((X, y))
    report = opt.last_step
    assert report.damping > -lam_min  # found by inertia: H + λI ≻ 0
    assert report.factorizations > 1
    assert report.new_loss < report.loss or not report.accepted


def test_trust_region_step_equals_dense_subproblem_solution():
    model, chain, dense, X, y = setup(seed=3)
    H, g = dense.hessian(X, y), dense.gradient(X, y)
    radius = 0.05
    opt = TrustRegion(chain, kind="hessian", radius=radius, rtol=1e-10, max_retries=0, damping=0.0)
    before = flat(model)
    opt.step(lambda: (X, y))
    report = opt.last_step
    assert report.accepted
    x_ref, lam_ref = trust_region_reference(H, g, radius)
    torch.testing.assert_close(flat(model) - before, x_ref, rtol=1e-8, atol=1e-12)
    assert abs(report.damping - lam_ref) <= 1e-6 * lam_ref
    assert abs(report.step_norm - radius) <= 1e-8 * radius


def test_a_rejected_step_leaves_the_parameters_unchanged():
    model, chain, dense, X, y = setup(seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    opt = TrustRegion(chain, kind="hessian", radius=1e3, max_radius=1e3, eta=0.2, max_retries=0)
    opt.step((X, y))
    report = opt.last_step
    assert not report.accepted and report.ratio < 0.2
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert report.radius == 1e3 and opt.param_groups[0]["radius"] < 1e3  # shrunk for the next step


@pytest.mark.parametrize(
    "make",
    [
        lambda chain: DampedNewton(chain, kind="ggn", damping=1.0),
        lambda chain: DampedNewton(chain, kind="hessian", damping=1.0),
        lambda chain: TrustRegion(chain, kind="hessian", radius=0.5),
        lambda chain: TrustRegion(chain, kind="ggn", radius=0.5),
    ],
)
def test_training_decreases_the_loss_monotonically(make):
    model, chain, dense, X, y = setup(seed=5, n=8)
    opt = make(chain)
    with torch.no_grad():
        losses = [float(chain(X, y))]
    for _ in range(6):
        opt.step((X, y))
        with torch.no_grad():
            losses.append(float(chain(X, y)))
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_relu_network_singular_hessian_does_not_crash():
    model, chain, dense, X, y = setup(seed=6, act=nn.ReLU)
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # dead first layer: H is singular at λ = 0
    opt = TrustRegion(chain, kind="hessian", radius=0.5, damping=0.0)
    opt.step((X, y))
    assert math.isfinite(opt.last_step.new_loss)
    opt2 = DampedNewton(chain, kind="hessian", damping=1e-12, min_damping=1e-12)
    opt2.step((X, y))
    assert math.isfinite(opt2.last_step.new_loss)


def test_optimizer_errors():
    model, chain, dense, X, y = setup()
    with pytest.raises(TypeError, match="Chain"):
        TrustRegion(model)
    with pytest.raises(ValueError, match="kind"):
        TrustRegion(chain, kind="fisher")
    with pytest.raises(ValueError, match="radius"):
        TrustRegion(chain, radius=-1.0)
    with pytest.raises(ValueError, match="damping"):
        DampedNewton(chain, damping=math.nan)
    with pytest.raises(ValueError, match="eta"):
        DampedNewton(chain, eta=0.5)
    opt = DampedNewton(chain)
    with pytest.raises(TypeError, match="inputs, targets"):
        opt.step(X)
    with pytest.raises(TypeError, match="inputs, targets"):
        opt.step(lambda: 1.0)


def test_gradient_batch_gives_the_subsampled_newton_step():
    """Curvature on the small batch, gradient (and ratio test) on the large one."""
    model, chain, dense, X, y = setup(seed=7, n=4)
    gen = torch.Generator().manual_seed(70)
    Xg, yg = torch.randn(20, 3, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    H, g = dense.ggn(X, y), dense.gradient(Xg, yg)
    opt = DampedNewton(chain, kind="ggn", damping=2.0, adaptive=False)
    before = flat(model)
    loss = opt.step((X, y), gradient_batch=(Xg, yg))
    assert abs(float(loss) - float(dense.loss_at(before, Xg, yg))) <= 1e-12
    expected = -torch.linalg.solve(H + 2.0 * torch.eye(len(H)), g)
    if opt.last_step.accepted:
        torch.testing.assert_close(flat(model) - before, expected, rtol=1e-9, atol=1e-13)
        assert abs(opt.last_step.new_loss - float(dense.loss_at(flat(model), Xg, yg))) <= 1e-12
    else:
        torch.testing.assert_close(flat(model), before, rtol=0, atol=0)
        assert float(dense.loss_at(before + expected, Xg, yg)) >= float(loss)


def test_non_finite_gradient_batch_is_refused():
    _, chain, _, X, y = setup(seed=2)
    Xg = X.clone()
    Xg[0, 0] = math.nan
    before = [p.detach().clone() for p in chain.parameters()]
    with pytest.raises(ValueError, match="gradient on gradient_batch contains NaN or inf"):
        DampedNewton(chain).step((X, y), (Xg, y))
    assert all(torch.equal(p, b) for p, b in zip(chain.parameters(), before))


@pytest.mark.parametrize("make", [
    lambda chain: DampedNewton(chain, kind="ggn", damping=1.0, adaptive=False),
    lambda chain: TrustRegion(chain, kind="hessian", radius=0.05, rtol=1e-10, max_retries=0, damping=0.0),
])
def test_a_loader_gives_the_step_of_its_concatenated_batch(make):
    # a step over a loader (a partial last batch included) is the step over all its samples
    steps = []
    for as_loader in (False, True):
        model, chain, dense, X, y = setup(seed=3, n=7)
        before = flat(model)
        batch = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3) if as_loader else (X, y)
        make(chain).step(batch)
        steps.append(flat(model) - before)
    assert float(steps[0].norm()) > 0
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-12, atol=1e-15)
