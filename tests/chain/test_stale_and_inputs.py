"""No silent wrong answers: stale curvatures, modules that change their input in place,
non-finite or graph-carrying vectors, zero right-hand sides and random modules."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import nn

import tallskinny as ts
from tallskinny import elimination
from tallskinny.optim import DampedNewton
from tallskinny.testing import dense_hessian, relative_error


def _mlp(batch: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    modules = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    X, y = torch.randn(batch, 3), torch.randint(0, 2, (batch,))
    return modules, X, y


def _num_parameters(chain) -> int:
    return sum(p.numel() for p in chain.parameters())


# -- 1. a curvature whose parameters changed in place -----------------------------------------
def _public_calls(curv, P):
    """Every public method of a curvature and of its factorization, as thunks."""
    fact = curv.factorize(0.5)
    v = torch.randn(P)
    return {
        "hvp": lambda: curv.hvp(v),
        "gradient": lambda: curv.gradient(),
        "solve": lambda: curv.solve(v, 0.5),
        "factorize": lambda: curv.factorize(0.5),
        "to_dense": lambda: curv.to_dense(),
        "fact.solve": lambda: fact.solve(v),
        "fact.logdet": lambda: fact.logdet(),
        "fact.sign": lambda: fact.sign(),
        "fact.inertia": lambda: fact.inertia(),
        "fact.is_positive_definite": lambda: fact.is_positive_definite(),
    }


def _add_(p):
    with torch.no_grad():
        p.add_(torch.randn_like(p))


def _sgd_step(p):
    p.grad = torch.randn_like(p)
    torch.optim.SGD([p], lr=0.1).step()
    p.grad = None


@pytest.mark.parametrize("change", [_add_, _sgd_step], ids=["add_", "sgd"])
def test_changed_parameter_makes_every_method_raise(change):
    modules, X, y = _mlp()
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    curv = chain.curvature(X, y)
    calls = _public_calls(curv, curv.num_parameters)
    for call in calls.values():
        call()  # unchanged: no false alarm
    change(modules[2].weight)
    for name, call in calls.items():
        with pytest.raises(ts.StaleCurvatureError, match=r"'2\.weight'.*chain\.curvature") as info:
            call()
        assert info.value.parameter == "2.weight", name
    assert issubclass(ts.StaleCurvatureError, RuntimeError)
    # made again, the curvature is the Hessian at the new parameters
    v = torch.randn(curv.num_parameters)
    H = dense_hessian(chain, X, y)
    assert relative_error(chain.curvature(X, y).hvp(v), H @ v) <= 1e-9


def test_changed_frozen_parameter_makes_the_curvature_stale():
    """A frozen weight is a constant of H that the oracles share too (``F = W``)."""
    modules, X, y = _mlp()
    modules[2].weight.requires_grad_(False)
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    curv = chain.curvature(X, y)
    _add_(modules[2].weight)
    with pytest.raises(ts.StaleCurvatureError, match=r"'2\.weight'"):
        curv.hvp(torch.randn(curv.num_parameters))


def test_optimizer_step_makes_an_earlier_curvature_stale():
    modules, X, y = _mlp()
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    curv = chain.curvature(X, y)
    opt = DampedNewton(chain, damping=1.0)
    opt.step((X, y))
    assert opt.last_step.accepted
    with pytest.raises(ts.StaleCurvatureError):
        curv.solve(torch.randn(curv.num_parameters), 0.1)


def test_rejected_trial_steps_leave_the_parameters_untouched():
    """The optimizer judges a trial step without applying it: rejected steps change no
    parameter (not even its version counter), so the step's curvature stays valid for
    the retries."""
    modules, X, y = _mlp(seed=4)
    with torch.no_grad():
        modules[0].weight.mul_(4)
        modules[2].weight.mul_(4)
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    before = [(p.detach().clone(), p._version) for p in chain.parameters()]
    opt = DampedNewton(chain, damping=1e-6, min_damping=1e-8, eta=0.2, max_retries=3)
    opt.step((X, y))
    assert not opt.last_step.accepted and opt.last_step.trials == 4  # every retry ran
    assert all(torch.equal(p, v) and p._version == n for p, (v, n) in zip(chain.parameters(), before))


def test_curvature_keeps_no_reference_to_the_inputs():
    """At one sample the first Linear's oracle keeps its input ``x``: it is a copy, so a
    later in-place change of the user's ``X`` changes nothing."""
    modules, X, y = _mlp(batch=1)
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    H = dense_hessian(chain, X, y)
    curv = chain.curvature(X, y)
    X.add_(1.0)
    V = torch.randn(curv.num_parameters, 2)
    assert relative_error(curv.hvp(V), H @ V) <= 1e-9
    M = H + 0.1 * torch.eye(H.shape[0])
    assert relative_error(curv.solve(V, 0.1), torch.linalg.solve(M, V)) <= 1e-9


# -- 2. modules that change their input in place ---------------------------------------------
class InplaceTanh(nn.Module):
    """Changes its input in place and does not say so (no ``inplace`` attribute)."""

    def forward(self, x):
        return x.tanh_()


class ScaledInplaceTanh(nn.Module):
    """With a parameter: ``tanh(x) ⊙ s``, ``x`` overwritten."""

    def __init__(self, width: int):
        super().__init__()
        self.s = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return x.tanh_() * self.s


class ScaledTanh(nn.Module):
    def __init__(self, twin: ScaledInplaceTanh):
        super().__init__()
        self.s = twin.s

    def forward(self, x):
        return torch.tanh(x) * self.s


def _out_of_place(m):
    if isinstance(m, InplaceTanh):
        return nn.Tanh()
    if isinstance(m, ScaledInplaceTanh):
        return ScaledTanh(m)
    return m


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("module", [InplaceTanh, ScaledInplaceTanh])
def test_module_changing_its_input_in_place(where, module):
    torch.manual_seed(1)
    if where == "first":
        modules = [module(3) if module is ScaledInplaceTanh else module(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    elif where == "middle":
        modules = [nn.Linear(3, 4), module(4) if module is ScaledInplaceTanh else module(), nn.Linear(4, 2)]
    else:
        modules = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), module(2) if module is ScaledInplaceTanh else module()]
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    reference = ts.Chain([_out_of_place(m) for m in modules], nn.CrossEntropyLoss())
    X, y = torch.randn(3, 3), torch.tensor([0, 1, 1])
    X0 = X.clone()
    H = dense_hessian(reference, X, y)
    loss = chain(X, y)
    assert torch.equal(X, X0)
    assert abs(loss.item() - reference(X, y).item()) <= 1e-12
    curv = chain.curvature(X, y)
    assert torch.equal(X, X0)
    V = torch.randn(H.shape[0], 2)
    assert relative_error(curv.hvp(V), H @ V) <= 1e-9
    M = H + 0.5 * torch.eye(H.shape[0])
    assert relative_error(curv.solve(V, 0.5), torch.linalg.solve(M, V)) <= 1e-9
    assert relative_error(chain.inverse_hvp(X, y, V[:, 0], 0.5), torch.linalg.solve(M, V[:, 0])) <= 1e-9
    assert torch.equal(X, X0)


def test_block_forward_leaves_its_input_alone():
    block = ts.blocks.block_for(InplaceTanh())
    z = torch.randn(2, 3)
    z0 = z.clone()
    out = block.forward(z, [])
    assert torch.equal(z, z0) and torch.allclose(out, torch.tanh(z0))


# -- 3. NaN or inf in a vector -------------------------------------------------------------
def _vectors(chain, bad: float, fmt: str):
    params = list(chain.parameters())
    if fmt == "flat":
        v = torch.randn(_num_parameters(chain))
        v[params[0].numel() + params[1].numel() + 1] = bad  # an entry of 2.weight
        return v
    v = [torch.randn(p.shape) for p in params]
    v[2][1, 0] = bad
    return v


@pytest.fixture
def counted():
    """A chain whose loss counts its calls (no pass may start for a bad vector)."""
    modules, X, y = _mlp()
    calls = []
    ce = nn.CrossEntropyLoss()

    def loss(z, t):
        calls.append(1)
        return ce(z, t)

    return ts.Chain(modules, loss), X, y, calls


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt", ["flat", "list"])
def test_non_finite_vectors_are_refused_before_any_work(counted, bad, fmt):
    chain, X, y, calls = counted
    curv = chain.curvature(X, y)
    fact = curv.factorize(0.5)
    calls.clear()
    v = _vectors(chain, bad, fmt)
    where = r"\[2\] \(parameter '2\.weight'\)" if fmt == "list" else r", at parameter '2\.weight',"
    cases = [
        ("v", lambda: chain.hvp(X, y, v)),
        ("b", lambda: chain.inverse_hvp(X, y, v, damping=0.5)),
        ("v", lambda: curv.hvp(v)),
        ("b", lambda: curv.solve(v, 0.5)),
        ("b", lambda: fact.solve(v)),
    ]
    with mock.patch.object(elimination, "factorize", side_effect=AssertionError("factorized")):
        for what, call in cases:
            with pytest.raises(ValueError, match=rf"^{what}{where} contains NaN or inf"):
                call()
    assert not calls  # no forward pass either
    # finite entries whose sum overflows are fine (the one-reduction test has a fallback)
    huge = torch.full((_num_parameters(chain),), 1e308)
    assert torch.equal(chain.layout().to_flat(huge, "v")[0][:, 0], huge)


# -- 4. random modules -------------------------------------------------------------------------
DROPOUTS = [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout]


@pytest.mark.filterwarnings("ignore:dropout[23]d. Received a 2-D input")  # the dense reference's call
@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda c: c.__name__)
def test_dropout_in_training_mode_is_refused(dropout):
    modules, X, y = _mlp()
    modules.insert(2, dropout(0.3))
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    P = _num_parameters(chain)
    for call in (
        lambda: chain.curvature(X, y),
        lambda: chain.hvp(X, y, torch.randn(P)),
        lambda: chain.inverse_hvp(X, y, torch.randn(P), damping=0.1),
    ):
        with pytest.raises(ts.NondeterministicModuleError, match=rf"block 2 \({dropout.__name__}\).*\.eval\(\)"):
            call()
    assert issubclass(ts.NondeterministicModuleError, ValueError)
    # the flag is read at the call: in eval mode the module is the identity, exactly
    modules[2].eval()
    H = dense_hessian(chain, X, y)
    V = torch.randn(P, 2)
    curv = chain.curvature(X, y)
    assert relative_error(curv.hvp(V), H @ V) <= 1e-9
    assert relative_error(curv.solve(V, 0.1), torch.linalg.solve(H + 0.1 * torch.eye(P), V)) <= 1e-9
    modules[2].train()
    with pytest.raises(ts.NondeterministicModuleError):
        chain.curvature(X, y)


def test_dropout_without_probability_is_the_identity_in_training_mode():
    modules, X, y = _mlp()
    modules.insert(2, nn.Dropout(0.0))
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    V = torch.randn(_num_parameters(chain), 2)
    assert relative_error(chain.curvature(X, y).hvp(V), dense_hessian(chain, X, y) @ V) <= 1e-9


class NoisyTanh(nn.Module):
    """An unregistered random module (the torch.func fallback): ``tanh(x) ⊙ (1 + 0.1ξ)``."""

    def forward(self, x):
        return torch.tanh(x) * (1 + 0.1 * torch.randn_like(x))


class MyDropout(nn.Dropout):
    """A dropout subclass with its own forward: the fallback, not the registered rule."""

    def forward(self, x):
        return super().forward(x) + 0.0


@pytest.mark.parametrize("random_module", [NoisyTanh, lambda: MyDropout(0.5)], ids=["noisy", "dropout_subclass"])
def test_random_fallback_module_is_refused(random_module):
    modules, X, y = _mlp()
    modules.insert(2, random_module())
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    assert isinstance(chain.blocks[2], ts.blocks.FuncBlock)
    with pytest.raises(ts.NondeterministicModuleError, match=r"block 2 .*differ.*\.eval\(\)"):
        chain.curvature(X, y)


def test_deterministic_fallback_module_is_accepted():
    modules, X, y = _mlp()
    modules.insert(2, MyDropout(0.5).eval())
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    V = torch.randn(_num_parameters(chain), 2)
    assert relative_error(chain.curvature(X, y).hvp(V), dense_hessian(chain, X, y) @ V) <= 1e-9


# -- 5. right-hand sides with autograd history, and zero right-hand sides ---------------------
def test_vectors_that_require_grad_are_detached():
    modules, X, y = _mlp()
    chain = ts.Chain(modules, nn.CrossEntropyLoss())
    curv = chain.curvature(X, y)
    P = curv.num_parameters
    H = dense_hessian(chain, X, y)
    M = H + 0.5 * torch.eye(P)
    leaf = torch.randn(P, 2, requires_grad=True)
    V = leaf * 2  # with history
    expected_hv, expected_x = H @ V.detach(), torch.linalg.solve(M, V.detach())
    results = [
        (curv.hvp(V), expected_hv),
        (chain.hvp(X, y, V), expected_hv),
        (curv.solve(V, 0.5), expected_x),
        (curv.factorize(0.5).solve(V), expected_x),
        (chain.inverse_hvp(X, y, V, damping=0.5), expected_x),
        (curv.solve(leaf, 0.5), torch.linalg.solve(M, leaf.detach())),
    ]
    for got, expected in results:
        assert not got.requires_grad and got.grad_fn is None
        assert relative_error(got, expected) <= 1e-9
    parts = curv.hvp([p.detach().clone().requires_grad_(True) for p in chain.parameters()])
    assert not any(t.requires_grad for t in parts)


@pytest.mark.parametrize("fmt", ["flat", "list"])
def test_zero_right_hand_sides(counted, fmt):
    chain, X, y, calls = counted
    curv = chain.curvature(X, y)
    fact = curv.factorize(0.5)
    calls.clear()
    params = list(chain.parameters())
    P = _num_parameters(chain)
    b = torch.randn(P, 0) if fmt == "flat" else [torch.randn(*p.shape, 0) for p in params]
    with mock.patch.object(elimination, "factorize", side_effect=AssertionError("factorized")):
        results = [
            chain.hvp(X, y, b),
            chain.inverse_hvp(X, y, b, damping=0.5),
            curv.hvp(b),
            curv.solve(b, 0.5),
            fact.solve(b),
        ]
    assert not calls
    for r in results:
        if fmt == "flat":
            assert isinstance(r, torch.Tensor) and r.shape == (P, 0)
        else:
            assert isinstance(r, list) and [t.shape for t in r] == [(*p.shape, 0) for p in params]
