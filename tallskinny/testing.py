"""Dense references and checks for chains, for this library's tests and for plugin authors.

``dense_hessian(chain, X, y)`` is the Hessian of the plain PyTorch loss as a function of
the flat parameters, by ``torch.func.jacrev(grad)`` (reverse over reverse: in torch 2.13
``torch.func.hessian`` is silently wrong for normalisation layers). ``check_chain``
asserts that a chain's HVP, solves, log-determinant and inertia agree with dense linear
algebra on it. Both are meant for small models (``P`` up to a few thousand).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacfwd, jacrev

from . import elimination
from .elimination import prepare_stages
from .elimination.stages.affine import AffineStage
from .elimination.stages.dense import DenseStage
from .elimination.stages.permuted import PermutedStage
from .elimination.stages.reduced_affine import ReducedAffineStage
from .elimination.supported import Supported

__all__ = [
    "AffineStage",
    "DenseStage",
    "PermutedStage",
    "ReducedAffineStage",
    "Supported",
    "check_chain",
    "dense_ggn",
    "dense_gradient",
    "dense_hessian",
    "elimination_forbidden",
    "large_stage_paths",
    "plain_dense_stages",
    "relative_error",
    "stages",
]


def _flat(chain, inputs, targets):
    """``(outputs(θ), loss(θ), θ_0)`` with the modules evaluated by ``functional_call``."""
    params = list(chain.parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    names = []
    for module in chain.modules:
        owned = {id(p): n for n, p in module.named_parameters()} if isinstance(module, torch.nn.Module) else {}
        names.append([owned[id(p)] for p in params if id(p) in owned])

    def outputs(theta):
        pieces = iter(t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes))
        z = inputs
        for module, ns in zip(chain.modules, names):
            z = functional_call(module, {n: next(pieces) for n in ns}, (z,))
        return z

    def loss(theta):
        return chain.loss(outputs(theta), targets)

    return outputs, loss, torch.cat([p.detach().reshape(-1) for p in params])


def _jacobian(outer: str):
    if outer not in ("reverse", "forward"):
        raise ValueError(f"outer must be 'reverse' or 'forward', got {outer!r}")
    return jacrev if outer == "reverse" else jacfwd


def dense_hessian(chain, inputs, targets, *, outer: str = "reverse") -> Tensor:
    """The ``P × P`` Hessian of the loss w.r.t. the chain's parameters (symmetrised).

    ``outer="forward"`` takes the outer derivative in forward mode, ``jacfwd(grad)``: the
    same matrix by another order of operations, so the two differ by the references' own
    rounding (where terms cancel, far above ``eps·‖H‖``)."""
    _, loss, theta0 = _flat(chain, inputs, targets)
    H = _jacobian(outer)(grad(loss))(theta0)
    return 0.5 * (H + H.mT)


def dense_ggn(chain, inputs, targets, *, outer: str = "reverse") -> Tensor:
    """The generalised Gauss–Newton matrix ``Jᵀ ∇²loss J`` (``outer="forward"``: the
    Jacobians in forward mode, as in ``dense_hessian``)."""
    jacobian = _jacobian(outer)
    outputs, _, theta0 = _flat(chain, inputs, targets)
    z = outputs(theta0).detach()
    J = jacobian(outputs)(theta0).reshape(z.numel(), -1)
    Hl = jacobian(grad(lambda zz: chain.loss(zz.reshape(z.shape), targets)))(z.reshape(-1))
    G = J.mT @ Hl @ J
    return 0.5 * (G + G.mT)


def dense_gradient(chain, inputs, targets) -> Tensor:
    _, loss, theta0 = _flat(chain, inputs, targets)
    return grad(loss)(theta0)


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_chain(chain, inputs, targets, damping: float, *, kind: str = "hessian", generator=None, k: int = 2, rtol: float = 1e-9):
    """Assert that HVP, solve, ``inverse_hvp``, ``log|det|``, sign and inertia of
    ``H + εI`` match dense references; returns the dense ``H`` (or GGN).

    Tolerances: products 1e-11 relative; solves ``max(rtol, 10·eps·cond)``;
    ``log|det|`` ``1e-9`` relative plus ``1e-13·P·cond``; inertia exactly.
    """
    curv = chain.curvature(inputs, targets, kind=kind)
    H = dense_hessian(chain, inputs, targets) if kind == "hessian" else dense_ggn(chain, inputs, targets)
    P = H.shape[0]
    eps = torch.finfo(H.dtype).eps
    V = torch.randn(P, k, generator=generator, dtype=H.dtype)
    assert relative_error(curv.hvp(V), H @ V) <= 1e-11, "hvp"
    M = H + damping * torch.eye(P, dtype=H.dtype)
    eig = torch.linalg.eigvalsh(M)
    cond = (eig.abs().max() / eig.abs().min()).item()
    tol = max(rtol, 10 * eps * cond)
    fact = curv.factorize(damping)
    assert relative_error(fact.solve(V), torch.linalg.solve(M, V)) <= tol, "solve"
    assert tuple(fact.inertia()) == ((eig > 0).sum().item(), (eig < 0).sum().item(), 0), "inertia"
    assert fact.sign().item() == (-1.0) ** (eig < 0).sum().item(), "sign"
    logdet = eig.abs().log().sum().item()
    assert abs(fact.logdet().item() - logdet) <= 1e-9 * max(1.0, abs(logdet)) + 1e-13 * P * cond, "logdet"
    b = V[:, 0]
    x = chain.inverse_hvp(inputs, targets, b, damping=damping, kind=kind)
    assert relative_error(x, torch.linalg.solve(M, b)) <= tol, "inverse_hvp"
    return H


# ---------------------------------------------------------------------------------------
# How the elimination treats a block: for tests of blocks and plugins. The stage classes
# above are re-exported for ``isinstance`` checks; their attributes are not an API.


def stages(curvature) -> list:
    """The elimination's stages of ``curvature``, one per block (prepared afresh, so
    inside :func:`plain_dense_stages` they take the plain path)."""
    return prepare_stages(curvature.oracles, curvature.loss_oracle)


@contextlib.contextmanager
def plain_dense_stages():
    """Within: dense stages made (and factored) ignore the structure they could exploit
    (``G = I_m ⊗ B`` spans, dead ReLU units), for comparisons with the plain path."""
    before = DenseStage.use_structure
    DenseStage.use_structure = False
    try:
        yield
    finally:
        DenseStage.use_structure = before


@contextlib.contextmanager
def large_stage_paths():
    """Within: every stage takes the paths the engine keeps for large stages — the
    sweeps' wide thin products (:mod:`tallskinny.linalg.thin`), a dense stage's Schur
    complement by half solves (``HALF_SOLVE_MIN_ORDER``: Bunch–Kaufman ``LDLᵀ`` or
    Cholesky) and by its upper blocks (``SPLIT_SCHUR_MIN``) — their thresholds lowered to
    1, so that small test models exercise them."""
    from .elimination import algebra
    from .linalg import thin

    before = (thin.WIDE_MIN, thin.THIN_RATIO, algebra.SPLIT_SCHUR_MIN, algebra.HALF_SOLVE_MIN_ORDER)
    thin.WIDE_MIN = thin.THIN_RATIO = algebra.SPLIT_SCHUR_MIN = algebra.HALF_SOLVE_MIN_ORDER = 1
    try:
        yield
    finally:
        thin.WIDE_MIN, thin.THIN_RATIO, algebra.SPLIT_SCHUR_MIN, algebra.HALF_SOLVE_MIN_ORDER = before


@contextlib.contextmanager
def elimination_forbidden():
    """Within: reaching the elimination (preparing stages or factoring) raises
    ``AssertionError``, for tests that a call is refused before the work."""

    def reached(*args, **kwargs):
        raise AssertionError("the elimination was reached: the call was not refused before the work")

    before = elimination.prepare_stages, elimination.factorize
    elimination.prepare_stages = elimination.factorize = reached
    try:
        yield
    finally:
        elimination.prepare_stages, elimination.factorize = before
