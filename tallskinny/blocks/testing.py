"""The shared block test-suite: check a block (or a loss) against the ``torch.func`` fallback.

For plugin authors and for tallskinny's own tests; each call is one line in a pytest test::

    from tallskinny.blocks.testing import check_block, check_loss

    def test_my_block():
        check_block(MyModule(3), torch.randn(4, 3, dtype=torch.float64))

:func:`check_block` asserts that the block's ``forward`` equals calling the module,
that ``forward`` is differentiable consistently with the oracle (its vector–Jacobian
product is ``(Gᵀg, Fᵀg)``), that every oracle field has the right shape, dtype and
device and, densified, equals the fallback's (with ``second_order`` True and False),
that each operator's products agree with its dense matrix, and that neither the inputs
nor the module (parameter values and identities, ``.grad``, ``requires_grad``,
buffers, training flags, hooks) changed. :func:`check_loss` does the same for a loss.
Failures raise ``AssertionError`` with a message naming the field.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..linalg import LinearOperator
from .base import FuncBlock
from .func import FuncLoss
from .protocol import DeferredOracle, DifferentiableBlock, LossBlock, Oracle
from .registry import block_for, loss_for

__all__ = ["assert_module_unchanged", "check_block", "check_loss", "default_tolerances"]

_FIELDS = ("G", "F", "A", "C", "E")


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)``: ``1e-12`` for float64, ``1e-5`` for float32, ``1e-2`` otherwise."""
    if dtype == torch.float64:
        return 1e-12, 1e-12
    if dtype == torch.float32:
        return 1e-5, 1e-5
    return 1e-2, 1e-2


def check_block(
    block_or_module: Any,
    z: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    g: Tensor | None = None,
    reference: DifferentiableBlock | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> Oracle:
    """Assert that a block is correct at ``z``; returns its oracle (``second_order=True``).

    ``block_or_module`` is an ``nn.Module`` (its block comes from
    :func:`~tallskinny.blocks.block_for`) or a block with a ``.module``. ``params``
    defaults to copies of the block's parameters, ``g`` to a seeded standard normal of
    the output's shape, ``reference`` to ``FuncBlock(module)``, the tolerances to
    :func:`default_tolerances` of ``z.dtype`` (elementwise ``|x − y| ≤ atol + rtol·|y|``).
    """
    block, module = _resolve_block(block_or_module)
    reference = FuncBlock(module) if reference is None else reference
    atol, rtol = _tolerances(z, atol, rtol)
    name = type(block).__name__
    with assert_module_unchanged(module):
        own = list(block.parameters())
        for i, p in enumerate(own):
            assert any(p is q for q in module.parameters()), (
                f"{name}.parameters()[{i}] is not one of the module's own parameter tensors"
            )
        ref_own = list(reference.parameters())
        assert len(own) == len(ref_own) and all(p is q for p, q in zip(own, ref_own)), (
            f"{name}.parameters() differ from the reference's (the module's parameters that "
            "require grad, in named_parameters() order)"
        )
        if params is None:
            params = [p.detach().clone() for p in own]
        params = list(params)
        inputs_before = [t.detach().clone() for t in [z, *params]]

        out = block.forward(z, params)
        assert isinstance(out, Tensor), f"{name}.forward returned {type(out).__name__}, not a tensor"
        expected = _call_module(module, own, z, params)
        _close(out, expected, atol, rtol, f"{name}.forward vs calling the module")
        if g is None:
            g = _randn(out.shape, out, seed)
        g_before = g.detach().clone()

        ref = reference.oracle(z, params, g, second_order=True)
        a_in, a_out, p = z.numel(), out.numel(), sum(t.numel() for t in params)
        sizes = {"G": (a_out, p), "F": (a_out, a_in), "A": (p, p), "C": (p, a_in), "E": (a_in, a_in)}
        result = None
        for second_order in (True, False):
            oracle = block.oracle(z, params, g, second_order=second_order)
            where = f"{name}.oracle(second_order={second_order})"
            _check_oracle(oracle, ref, sizes, z, where, atol, rtol, exact_second_order=second_order, seed=seed)
            if second_order:
                result = oracle
        _check_vjp(block, z, params, g, result, atol, rtol, name)

        for before, after, label in zip(inputs_before + [g_before], [z, *params, g], _input_labels(len(params))):
            assert torch.equal(before, after.detach()), f"{name} modified its input {label} in place"
    return result


def check_loss(
    loss_or_block: Any,
    z: Tensor,
    target: Any,
    *,
    reference: LossBlock | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> Oracle:
    """Assert that a loss block is correct at ``(z, target)``; returns its oracle.

    ``loss_or_block`` is a loss module or callable (its block comes from
    :func:`~tallskinny.blocks.loss_for`) or a loss block with a ``.module`` (or a
    :class:`FuncLoss`). The reference is ``FuncLoss`` of the module or callable.
    """
    block, fn = _resolve_loss(loss_or_block)
    reference = FuncLoss(fn) if reference is None else reference
    atol, rtol = _tolerances(z, atol, rtol)
    name = type(block).__name__
    module = fn if isinstance(fn, nn.Module) else nn.Module()
    with assert_module_unchanged(module):
        z_before = z.detach().clone()
        target_before = target.detach().clone() if isinstance(target, Tensor) else None
        block.check_target(z, target)
        value = block.forward(z, target)
        assert isinstance(value, Tensor) and value.dim() == 0, f"{name}.forward must return a 0-dim tensor"
        _close(value, fn(z.detach().clone(), target), atol, rtol, f"{name}.forward vs calling the loss")

        ref = reference.oracle(z, target)
        a_in = z.numel()
        sizes = {"G": (1, 0), "F": (1, a_in), "A": (0, 0), "C": (0, a_in), "E": (a_in, a_in)}
        oracle = block.oracle(z, target)
        _check_oracle(oracle, ref, sizes, z, f"{name}.oracle", atol, rtol, exact_second_order=True, seed=seed)

        z_var = z.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(block.forward(z_var, target), z_var)
        _close(grad.reshape(1, -1), oracle.F.to_dense(), atol, rtol, f"autograd of {name}.forward vs its F")

        assert torch.equal(z_before, z.detach()), f"{name} modified z in place"
        if target_before is not None:
            assert torch.equal(target_before, target.detach()), f"{name} modified the target in place"
    return oracle


@contextlib.contextmanager
def assert_module_unchanged(module: nn.Module) -> Iterator[None]:
    """Assert that the body leaves ``module`` as it was: parameter values and identities,
    ``.grad``, ``requires_grad``, buffers, training flags and hooks of every submodule."""
    before = _snapshot(module)
    yield
    after = _snapshot(module)
    assert before.keys() == after.keys(), (
        f"the set of parameters/buffers/submodules changed: {sorted(before.keys() ^ after.keys())}"
    )
    for key, old in before.items():
        new = after[key]
        if isinstance(old, Tensor):
            same = isinstance(new, Tensor) and old.shape == new.shape and old.dtype == new.dtype and bool(
                torch.isclose(old, new, rtol=0, atol=0, equal_nan=True).all()
            )
        else:
            same = not isinstance(new, Tensor) and old == new
        assert same, f"the module changed: {key}"


# ---------------------------------------------------------------------------------------
def _resolve_block(x) -> tuple[DifferentiableBlock, nn.Module]:
    if isinstance(x, nn.Module):
        return block_for(x), x
    module = getattr(x, "module", None)
    if isinstance(x, DifferentiableBlock) and isinstance(module, nn.Module):
        return x, module
    raise TypeError(
        f"check_block needs an nn.Module or a block with a .module attribute (to build the reference), "
        f"got {type(x).__name__}"
    )


def _resolve_loss(x) -> tuple[LossBlock, Any]:
    if isinstance(x, nn.Module) or (callable(x) and not isinstance(x, LossBlock)):
        return loss_for(x), x
    if isinstance(x, FuncLoss):
        return x, x.loss
    module = getattr(x, "module", None)
    if isinstance(x, LossBlock) and isinstance(module, nn.Module):
        return x, module
    raise TypeError(
        f"check_loss needs a loss module or callable, or a loss block with a .module attribute, "
        f"got {type(x).__name__}"
    )


def _tolerances(z: Tensor, atol, rtol) -> tuple[float, float]:
    default_atol, default_rtol = default_tolerances(z.dtype)
    return (default_atol if atol is None else atol), (default_rtol if rtol is None else rtol)


def _randn(shape, like: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def _close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual, expected = actual.detach(), expected.detach()
    if actual.numel() == 0:
        return
    error = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((error <= bound).all()):
        worst = int(torch.argmax(error - bound))
        raise AssertionError(
            f"{what}: max |difference| {float(error.max()):.3e} exceeds atol={atol:g} + rtol={rtol:g}·|expected| "
            f"(worst at flat index {worst}: {float(actual.reshape(-1)[worst]):.17g} vs "
            f"{float(expected.reshape(-1)[worst]):.17g})"
        )


def _check_oracle(
    oracle,
    ref: Oracle,
    sizes: dict,
    z: Tensor,
    where: str,
    atol: float,
    rtol: float,
    *,
    exact_second_order: bool,
    seed: int,
) -> None:
    assert isinstance(oracle, Oracle), f"{where} returned {type(oracle).__name__}, not an Oracle"
    if isinstance(oracle, DeferredOracle):
        _check_hints(oracle, sizes, where, atol, rtol)
    for field in _FIELDS:
        op = getattr(oracle, field)
        label = f"{where}.{field}"
        assert isinstance(op, LinearOperator), f"{label} is {type(op).__name__}, not a LinearOperator"
        assert tuple(op.shape) == sizes[field], f"{label} has shape {tuple(op.shape)}, expected {sizes[field]}"
        assert op.dtype == z.dtype, f"{label} has dtype {op.dtype}, expected {z.dtype}"
        assert op.device == z.device, f"{label} is on {op.device}, expected {z.device}"
        dense = op.to_dense()
        assert tuple(dense.shape) == sizes[field], f"{label}.to_dense() has shape {tuple(dense.shape)}"
        expected = getattr(ref, field).to_dense()
        if field in "ACE" and not exact_second_order:
            # second_order=False: zeros (the work skipped) or the exact value
            if not bool((dense == 0).all()):
                _close(dense, expected, atol, rtol, f"{label} (neither zero nor the exact value)")
        else:
            _close(dense, expected, atol, rtol, label)
        if field in "AE":
            _close(dense, dense.mT, atol, rtol, f"{label} symmetry")
        if op.symmetric:
            _close(dense, dense.mT, atol, rtol, f"{label} declares symmetric=True")
        _check_products(op, dense, label, atol, rtol, seed)


def _check_hints(oracle: DeferredOracle, sizes: dict, where: str, atol: float, rtol: float) -> None:
    """A deferred oracle's ``sizes`` and hints describe the operators it builds."""
    a_out, p = sizes["G"]
    a_in = sizes["F"][1]
    assert oracle.sizes == (a_in, a_out, p), f"{where}: DeferredOracle.sizes {oracle.sizes} != {(a_in, a_out, p)}"
    assert not oracle.built, f"{where}: the DeferredOracle was built before its operators were asked for"
    if oracle.linear is not None:
        W, x, g = oracle.linear
        m, n = W.shape
        assert tuple(x.shape) == (n, 1) and p in (m * n, m * (n + 1)), f"{where}: linear hint of the wrong shapes"
        _close(oracle.F.to_dense(), W, atol, rtol, f"{where}: linear hint W vs F")
        G = oracle.G.to_dense()  # θ = [vec(W), b]: G = [I ⊗ xᵀ, I]; θ = vec(W): G = I ⊗ xᵀ
        eye_m, eye_n = (torch.eye(k, dtype=W.dtype, device=W.device) for k in (m, n))
        G_W = (eye_m[:, :, None] * x.reshape(1, 1, n)).reshape(m, m * n)  # I_m ⊗ xᵀ
        _close(G[:, : m * n], G_W, atol, rtol, f"{where}: linear hint x vs G")
        if p > m * n:
            _close(G[:, m * n :], eye_m, atol, rtol, f"{where}: bias columns of G")
        for field in "AE":
            assert not bool(getattr(oracle, field).to_dense().any()), f"{where}: linear hint with {field} ≠ 0"
        C = oracle.C.to_dense()
        if g is None:
            assert not bool(C.any()), f"{where}: linear hint says C = 0, but C ≠ 0"
        else:  # C[(k,j), j'] = g_k δ(j,j'); no bias row
            expected = torch.cat(((g.reshape(m, 1, 1) * eye_n).reshape(m * n, n), C.new_zeros(p - m * n, n)))
            _close(C, expected, atol, rtol, f"{where}: linear hint g vs C")
    if oracle.diagonal is not None:
        d, e = oracle.diagonal
        assert p == 0 and tuple(d.shape) == (a_in, 1), f"{where}: diagonal hint of the wrong shapes"
        _close(oracle.F.to_dense(), torch.diag(d.reshape(-1)), atol, rtol, f"{where}: diagonal hint d vs F")
        E = oracle.E.to_dense()
        _close(E, torch.diag(e.reshape(-1)) if e is not None else torch.zeros_like(E), atol, rtol, f"{where}: diagonal hint e vs E")


def _check_products(op: LinearOperator, dense: Tensor, label: str, atol: float, rtol: float, seed: int) -> None:
    m, n = op.shape
    if m == 0 or n == 0:
        return
    scale = float(dense.abs().max()) if dense.numel() else 0.0
    tol = atol + rtol * scale * max(m, n)
    x = _randn((n, 2), dense, seed + 1)
    y = _randn((m, 2), dense, seed + 2)
    _close(op @ x, dense @ x, tol, 0.0, f"{label} @ x vs to_dense() @ x")
    _close(op @ x[:, 0], dense @ x[:, 0], tol, 0.0, f"{label} @ vector vs to_dense() @ vector")
    _close(op.T @ y, dense.mT @ y, tol, 0.0, f"{label}.T @ y vs to_dense().T @ y")


def _check_vjp(block, z: Tensor, params: list[Tensor], g: Tensor, oracle: Oracle, atol, rtol, name: str) -> None:
    """``forward`` must be differentiable, with ``∂⟨g, z_out⟩/∂z = Fᵀg`` and ``∂⟨g, z_out⟩/∂θ = Gᵀg``."""
    z_var = z.detach().clone().requires_grad_(True)
    p_vars = [t.detach().clone().requires_grad_(True) for t in params]
    out = block.forward(z_var, p_vars)
    grads = torch.autograd.grad(out, [z_var, *p_vars], g, allow_unused=True)
    grads = [torch.zeros_like(v) if d is None else d for d, v in zip(grads, [z_var, *p_vars])]
    g_flat = g.detach().reshape(-1)
    what = f"autograd of {name}.forward w.r.t. z vs Fᵀg"
    _close(grads[0].reshape(-1), oracle.F.T @ g_flat, atol, rtol, what)
    if p_vars:
        theta_grad = torch.cat([d.reshape(-1) for d in grads[1:]])
        _close(theta_grad, oracle.G.T @ g_flat, atol, rtol, f"autograd of {name}.forward w.r.t. θ vs Gᵀg")


def _call_module(module: nn.Module, own: list[Tensor], z: Tensor, params: list[Tensor]) -> Tensor:
    """Call (a deep copy of) the module itself, with its trainable parameters set to ``params``."""
    names = {id(p): n for n, p in module.named_parameters()}
    twin = copy.deepcopy(module)
    twin_params = dict(twin.named_parameters())
    with torch.no_grad():
        for p, value in zip(own, params):
            twin_params[names[id(p)]].copy_(value)
        return twin(z.detach().clone())


def _snapshot(module: nn.Module) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        tag = prefix or "<root>"
        state[f"{tag}: class"] = type(m)
        state[f"{tag}: training"] = m.training
        for attr, value in vars(m).items():
            if "hook" in attr and isinstance(value, dict):
                state[f"{tag}: {attr}"] = [(k, id(v)) for k, v in value.items()]
        state[f"{tag}: instance forward"] = id(vars(m).get("forward"))
    for n, p in module.named_parameters(remove_duplicate=False):
        state[f"parameter {n}: identity"] = id(p)
        state[f"parameter {n}: value"] = p.detach().clone()
        state[f"parameter {n}: requires_grad"] = p.requires_grad
        state[f"parameter {n}: grad"] = None if p.grad is None else p.grad.detach().clone()
        state[f"parameter {n}: grad identity"] = id(p.grad)
    for n, b in module.named_buffers(remove_duplicate=False):
        state[f"buffer {n}: identity"] = id(b)
        state[f"buffer {n}: value"] = b.detach().clone()
    return state


def _input_labels(n_params: int) -> list[str]:
    return ["z"] + [f"params[{i}]" for i in range(n_params)] + ["g"]
