"""``Chain``: a sequence of modules (or blocks) ending in a scalar loss.

The chain turns each module into a block through the registry, runs the forward pass,
asks each block for its oracle from the loss back (the adjoints ``g_l = ∂loss/∂z_l``
passed down through the oracles' ``F``), and hands the oracles to
:class:`~tallskinny.curvature.Curvature`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .collector import collector_paused
from . import resources
from .blocks import LossBlock, Oracle, OracleMemory, block_for, checks, loss_for
from .blocks.elementwise import SharedDerivatives, batch_key
from .batches import one_batch
from .blocks.protocol import DeferredOracle
from .curvature import Curvature, ParameterVersions, check_damping, check_kind, check_precision, check_refine
from .errors import NondeterministicModuleError
from .resources import MemoryEstimate, check_memory_limit
from . import routes
from .routes import check_method
from .linalg import Zero
from .vectors import ParameterLayout


class Chain:
    """A chain ``z_l = f_l(z_{l-1}; θ_l)``, ``l = 1..L``, and a scalar ``loss(z_L, target)``.

    ``modules`` are ``nn.Module``s (mapped to blocks through the registry; unregistered
    ones fall back to ``torch.func`` unless ``strict=True``) or objects that implement
    :class:`~tallskinny.blocks.DifferentiableBlock`. ``loss`` is a registered loss module
    (``nn.CrossEntropyLoss``, ``nn.MSELoss``) or any callable ``loss(z, target) -> scalar``.

    The chain shares the modules' parameters (nothing is copied) and never changes the
    modules: parameter values, ``.grad``, ``requires_grad``, training flags and hooks
    are as they were after every call.
    """

    def __init__(self, modules: Iterable, loss: Callable, *, strict: bool = False):
        modules = list(modules)
        if not modules:
            raise ValueError("a Chain needs at least one module before the loss")
        if not callable(loss) and not isinstance(loss, LossBlock):
            raise TypeError(f"loss must be a callable loss(z, target) or a LossBlock, got {type(loss).__name__}")
        self.modules = modules
        self.loss = loss
        self.blocks = [block_for(m, strict=strict) for m in modules]
        self.loss_block = loss_for(loss, strict=strict)
        self._params = [list(b.parameters()) for b in self.blocks]
        seen: dict[int, int] = {}
        for i, ps in enumerate(self._params):
            for p in ps:
                if id(p) in seen:
                    raise ValueError(
                        f"a parameter of block {i} ({_name(modules[i])}) is shared with block "
                        f"{seen[id(p)]} ({_name(modules[seen[id(p)]])}); parameters shared between "
                        "blocks (weight tying) are not supported"
                    )
                seen[id(p)] = i
        # θ is fixed when the chain is made, and with it the parameters' names
        self._names = tuple(
            f"{i}.{n}" for i, (m, ps) in enumerate(zip(self.modules, self._params)) for n in _param_names(m, ps)
        )
        # every tensor a curvature may share memory with: θ and the frozen parameters
        watched: dict[int, tuple[str, Tensor]] = {}
        for i, (m, ps) in enumerate(zip(self.modules, self._params)):
            named = m.named_parameters() if isinstance(m, nn.Module) else zip(_param_names(m, ps), ps)
            for n, p in named:
                watched.setdefault(id(p), (f"{i}.{n}", p))
        self._watched_names = tuple(n for n, _ in watched.values())
        self._watched = tuple(p for _, p in watched.values())
        self._block_names = tuple(_name(m) for m in modules)
        # what each block and the loss allocate for their oracles, as they state it from
        # shapes (None: not stated), and the curvature pass's estimates by shapes
        self._oracle_sizers = [b.oracle_bytes if isinstance(b, OracleMemory) else None for b in self.blocks]
        self._loss_sizer = self.loss_block.oracle_bytes if isinstance(self.loss_block, OracleMemory) else None
        self._memory_plans: dict = {}

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential, loss: Callable, *, strict: bool = False) -> "Chain":
        """The chain of the children of an ``nn.Sequential``, in order."""
        if not isinstance(sequential, nn.Sequential):
            raise TypeError(f"from_sequential needs an nn.Sequential, got {type(sequential).__name__}")
        return cls(list(sequential), loss, strict=strict)

    # -- plain evaluation --------------------------------------------------------------
    def __call__(self, inputs: Tensor, targets) -> Tensor:
        """The loss, as plain PyTorch computes it (the modules are called as usual, on a
        copy of ``inputs``: a module that changes its input in place leaves them as they are)."""
        z = inputs.clone() if isinstance(inputs, Tensor) else inputs
        for m, block, params in zip(self.modules, self.blocks, self._params):
            z = m(z) if isinstance(m, nn.Module) else block.forward(z, params)
        return self.loss(z, targets) if callable(self.loss) else self.loss_block.forward(z, targets)

    def parameters(self) -> Iterator[Tensor]:
        """The blocks' parameters in order (the modules' own tensors)."""
        for ps in self._params:
            yield from ps

    def layout(self) -> ParameterLayout:
        """Shapes, names, dtype and device of the parameters."""
        params = list(self.parameters())
        if not params:
            raise ValueError("the chain has no parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(
                f"all parameters must share one dtype and device, found {sorted(map(str, dtypes))} "
                f"on {sorted(map(str, devices))}"
            )
        return ParameterLayout(
            shapes=tuple(tuple(p.shape) for p in params),
            names=self._names,
            dtype=params[0].dtype,
            device=params[0].device,
        )

    # -- curvature ---------------------------------------------------------------------
    @collector_paused
    def curvature(
        self,
        inputs,
        targets=None,
        kind: str = "hessian",
        *,
        method: str = "auto",
        memory_limit: float | None = None,
        distributed: bool | None = None,
    ) -> Curvature:
        """Forward pass, one backward pass, and every block's oracle at ``(inputs, targets)``.

        ``inputs`` may also be a re-iterable of ``(inputs, targets)`` batches (a
        ``DataLoader``; ``targets`` then ``None``): the curvature of the loss over all their
        samples as if they were one batch (:func:`tallskinny.batches.one_batch`). Where
        ``torch.distributed`` is initialized, each rank's loader is its shard and every
        rank gets the curvature over all ranks' samples (``distributed``: ``None``, the
        default, gathers loaders there; ``True`` tensors too; ``False`` never;
        :mod:`tallskinny.distributed`, ``docs/distributed.md``).

        ``kind="hessian"`` gives the Hessian of the loss w.r.t. all parameters,
        ``kind="ggn"`` the generalised Gauss–Newton matrix ``Jᵀ ∇²loss J``.

        The curvature holds a copy of ``inputs`` but shares memory with the parameters:
        once one of them is changed in place, its methods raise
        :class:`~tallskinny.errors.StaleCurvatureError`. A module that is random here
        (dropout in training mode) raises :class:`~tallskinny.errors.NondeterministicModuleError`.

        ``memory_limit`` (bytes; ``None``: the memory available at each call,
        ``float('inf')``: no check) bounds the estimated memory of this pass, checked after
        the forward pass, and of the curvature's ``factorize``, ``solve`` and ``to_dense``,
        checked before each: a call whose estimate exceeds it raises
        :class:`~tallskinny.errors.ResourceError` before any work (:mod:`tallskinny.resources`).

        ``method`` is the exact route the curvature's factorizations take: ``"riccati"``
        (the stagewise elimination), ``"kernel"`` (Gauss–Newton only: the ``P × N·c``
        factor of ``G``), ``"dense"`` (the ``P × P`` matrix, eigendecomposed) or
        ``"auto"`` (the cheapest that fits, estimated from the shapes; ``curv.method``
        says which, ``curv.explain()`` why). ``"krylov"`` (or
        ``tallskinny.routes.Krylov(rtol=..., maxiter=..., preconditioner_batch=...)``) is
        the inexact, opt-in iterative route: CG (GGN) or MINRES (Hessian) over all samples,
        preconditioned by the exact factorization of the first samples; never chosen by
        ``auto``. See ``docs/routes.md``.
        """
        kind = check_kind(kind)
        method = check_method(method)
        memory_limit = check_memory_limit(memory_limit)
        inputs, targets = one_batch(
            inputs, targets, what="Chain.curvature", distributed=distributed, parameters=self.parameters()
        )
        return self._curvature(inputs, targets, kind, self.layout(), memory_limit, method)

    def _curvature(
        self,
        inputs: Tensor,
        targets,
        kind: str,
        layout: ParameterLayout,
        memory_limit: float | None,
        method: str = "auto",
    ) -> Curvature:
        self._check_inputs(inputs, layout)
        versions = ParameterVersions(self._watched_names, self._watched)
        # detached copies: the oracles see these values, and no autograd graph is built
        # (the adjoints come from the blocks' own derivatives, :meth:`_oracles`)
        thetas = [[p.detach() for p in ps] for ps in self._params]
        with torch.enable_grad(), checks.trusted():
            # a copy: the first oracle may keep its input, and the user may change theirs
            zs = [inputs.detach().clone()]
            for i, block in enumerate(self.blocks):
                try:
                    z = block.forward(zs[-1], thetas[i])
                except NondeterministicModuleError as err:
                    raise NondeterministicModuleError(f"block {i} ({_name(self.modules[i])}): {err}") from None
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    raise ValueError(
                        f"block {i} ({_name(self.modules[i])}) failed on an input of shape "
                        f"{tuple(zs[-1].shape)}: {err}"
                    ) from err
                if not isinstance(z, Tensor):
                    raise TypeError(f"block {i} ({_name(self.modules[i])}) returned {type(z).__name__}, not a tensor")
                zs.append(z.detach())
            self.loss_block.check_target(zs[-1], targets)
            loss = self.loss_block.forward(zs[-1], targets)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"the loss must be a scalar (0-dim tensor), got {shape}")
            loss = loss.detach()
        # the forward pass gave the shapes: refuse before the oracles
        samples, estimate = self._check_memory(zs, kind, layout, memory_limit)
        self._check_finite(zs, "z")
        n = len(self.blocks)
        with checks.trusted():
            loss_oracle = self.loss_block.oracle(zs[-1], targets)
            _check_oracle(loss_oracle, n, self.loss, zs[-1], loss, 0)
            oracles, adjoints = self._oracles(zs, thetas, loss_oracle, kind == "hessian")
        self._check_finite(adjoints, "g")
        return Curvature(
            oracles, loss_oracle, adjoints, layout, kind, loss, versions,
            memory_limit=memory_limit, samples=samples, names=self._block_names, method=method,
            pass_bytes=estimate.total,
            preconditioner=routes.krylov.preconditioner_curvature(self, inputs, targets, kind, method, memory_limit),
        )

    def _check_memory(
        self, zs: Sequence[Tensor], kind: str, layout: ParameterLayout, limit: float | None
    ) -> tuple[int | None, MemoryEstimate]:
        """Refuse the curvature pass where its estimate exceeds ``limit``; the batch size
        where every activation leads with it, and the estimate. The estimate is made once
        per input and output shape (a block's output shape is a function of its input's):
        reading all the shapes of a deep chain would cost more than the check itself."""
        itemsize = layout.dtype.itemsize
        key = (zs[0].shape, zs[-1].shape, len(zs), kind, itemsize)
        plan = self._memory_plans.get(key)
        if plan is None:
            if len(self._memory_plans) >= 16:  # a few batch shapes in turn, not a growing cache
                self._memory_plans.clear()
            shapes = tuple(tuple(z.shape) for z in zs)
            estimate = self._memory_estimate(shapes, kind == "hessian", itemsize)
            plan = self._memory_plans[key] = (estimate, shapes, resources.samples_of(shapes))
        estimate, shapes, samples = plan
        resources.require(
            estimate, limit, layout.device, what="Chain.curvature",
            advice=lambda limit: self._memory_advice(shapes, kind, itemsize, limit),
        )
        return samples, estimate

    def _memory_estimate(self, shapes, second_order: bool, itemsize: int) -> MemoryEstimate:
        return resources.curvature_estimate(
            self._oracle_sizers, self._loss_sizer, shapes, self._block_names,
            second_order=second_order, itemsize=itemsize,
        )

    def _memory_advice(self, shapes, kind: str, itemsize: int, limit: float) -> list[str]:
        """What would fit: a smaller batch, the Gauss–Newton matrix."""
        out = []
        samples = resources.samples_of(shapes)
        if samples is not None:
            def at(b: int) -> int:
                return self._memory_estimate(resources.batch_shapes(shapes, b), kind == "hessian", itemsize).total

            out.append(resources.batch_advice(at, samples, limit))
        if kind == "hessian":
            ggn = self._memory_estimate(shapes, False, itemsize).total
            out.append(f"kind='ggn' needs about {resources.format_bytes(ggn)}")
        return out

    def _oracles(self, zs, thetas, loss_oracle, second_order: bool) -> tuple[list[Oracle], list[Tensor]]:
        """The blocks' oracles and the adjoints ``g_i = ∂loss/∂z_{i+1}`` of their outputs, in
        one sweep from the loss back: ``g_n = ∇ℓ`` (the loss oracle's ``F``), block ``i``'s
        oracle at ``g_i``, then ``g_{i−1} = F_iᵀ g_i``. These are the blocks' own first
        derivatives, not autograd's backward formulas (which lose the digits of saturated
        units: ``1 − t²`` of tanh, ``1 + erf`` of GELU). An output upstream of every
        parameter has no part in ``H`` (every tangent there is zero): its adjoint is zero."""
        n = len(self.blocks)
        groups = self._shared_derivatives(zs, thetas)
        shared = {i: (group, k) for group, index in groups for k, i in enumerate(index)}
        follows_a_parameter = [False] * (n + 1)  # [i]: z_i depends on a parameter (of a block before i)
        for i in range(n):
            follows_a_parameter[i + 1] = follows_a_parameter[i] or bool(thetas[i])
        g = loss_oracle.F.T.matmat(torch.ones(1, 1, dtype=zs[-1].dtype, device=zs[-1].device))
        g = g.reshape(zs[-1].shape) if follows_a_parameter[n] else torch.zeros_like(zs[-1])
        oracles: list = [None] * n
        adjoints: list = [None] * n
        for i in range(n - 1, -1, -1):
            adjoints[i] = g
            found = shared.get(i)
            if found is None:
                block = self.blocks[i]
                try:
                    o = block.oracle(zs[i], thetas[i], g, second_order=second_order)
                except NondeterministicModuleError as err:
                    raise NondeterministicModuleError(f"block {i} ({_name(self.modules[i])}): {err}") from None
                _check_oracle(o, i, self.modules[i], zs[i], zs[i + 1], sum(t.numel() for t in thetas[i]))
                oracles[i] = o
            if not follows_a_parameter[i]:
                g = torch.zeros_like(zs[i])
            elif found is not None:
                group, k = found
                g = group.slopes[k].reshape(zs[i].shape) * g
            else:
                g = _input_adjoint(oracles[i], g, zs[i])
        for group, index in groups:
            made = group.oracles([adjoints[i] for i in index], second_order=second_order)
            for i, o in zip(index, made):
                _check_oracle(o, i, self.modules[i], zs[i], zs[i + 1], 0)
                oracles[i] = o
        if not second_order:
            oracles = [_gauss_newton(o) for o in oracles]
        return oracles, adjoints

    def _shared_derivatives(self, zs, thetas) -> list[tuple[SharedDerivatives, list[int]]]:
        """Built-in activation blocks that share a derivative rule, their derivatives computed
        together (:class:`~tallskinny.blocks.elementwise.SharedDerivatives`), with their
        block indices."""
        index: dict = {}
        for i, block in enumerate(self.blocks):
            key = batch_key(block)
            if key is not None:
                index.setdefault(key, []).append(i)
        return [
            (SharedDerivatives([self.blocks[i] for i in idx], [zs[i] for i in idx], [thetas[i] for i in idx]), idx)
            for idx in index.values()
            if len(idx) > 1
        ]

    @collector_paused
    def hvp(
        self, inputs: Tensor, targets, v, *, kind: str = "hessian", method: str = "auto",
        memory_limit: float | None = None,
    ):
        """``H v`` at ``(inputs, targets)``, in the format of ``v`` (``(P, 0)``: empty, no
        pass; ``memory_limit``: as for :meth:`curvature`)."""
        kind = check_kind(kind)
        method = check_method(method)  # (the product is the same on every route)
        memory_limit = check_memory_limit(memory_limit)
        layout = self.layout()
        x, fmt = layout.to_flat(v, "v")
        if x.shape[1] == 0:
            self._check_inputs(inputs, layout)
            return layout.from_flat(x.new_zeros(x.shape), fmt)
        return self._curvature(inputs, targets, kind, layout, memory_limit, "riccati").hvp(v)

    @collector_paused
    def inverse_hvp(
        self,
        inputs: Tensor,
        targets,
        b,
        damping: float = 0.0,
        *,
        kind: str = "hessian",
        refine: int | None = None,
        method: str = "auto",
        memory_limit: float | None = None,
        precision: str = "full",
    ):
        """``(H + damping·I)^{-1} b`` at ``(inputs, targets)``, in the format of ``b``
        (``(P, 0)``: empty, no pass and no factorization; ``memory_limit``: as for
        :meth:`curvature`; the factorization is checked once the oracles are made, before
        the elimination; ``precision``: as for :meth:`Curvature.factorize
        <tallskinny.curvature.Curvature.factorize>`: ``"mixed"`` factors in float32 and
        refines in float64)."""
        damping = check_damping(damping)
        kind = check_kind(kind)
        check_refine(refine)
        check_precision(precision)
        method = check_method(method)
        memory_limit = check_memory_limit(memory_limit)
        layout = self.layout()
        x, fmt = layout.to_flat(b, "b")
        if x.shape[1] == 0:
            self._check_inputs(inputs, layout)
            return layout.from_flat(x.new_zeros(x.shape), fmt)
        return self._curvature(inputs, targets, kind, layout, memory_limit, method).solve(
            b, damping, refine=refine, precision=precision
        )

    def _check_finite(self, tensors: Sequence[Tensor], name: str) -> None:
        """Every activation (``name = "z"``: the blocks' inputs and the loss's) or every
        adjoint (``"g"``: of the blocks' outputs) is finite (one reduction for all)."""
        if bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all()):
            return
        for i, t in enumerate(tensors[: len(self.blocks)]):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"block {i} ({_name(self.modules[i])}): {name} contains NaN or inf; "
                    "derivatives at a non-finite point are undefined"
                )
        raise ValueError(
            f"the loss input (output of block {len(self.blocks) - 1}) contains NaN or inf; "
            "derivatives at a non-finite point are undefined"
        )

    def _check_inputs(self, inputs, layout: ParameterLayout) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.device != layout.device:
            raise ValueError(f"inputs are on {inputs.device}, the parameters on {layout.device}")
        if inputs.dtype.is_floating_point and inputs.dtype != layout.dtype:
            raise TypeError(f"inputs have dtype {inputs.dtype}, the parameters {layout.dtype}")

    def __repr__(self) -> str:
        inner = ", ".join(_name(m) for m in self.modules)
        return f"Chain([{inner}], loss={_name(self.loss)})"


# ---------------------------------------------------------------------------------------
def _name(m) -> str:
    return type(m).__name__ if not isinstance(m, nn.Module) else m._get_name()


def _param_names(module, params: Sequence[Tensor]) -> list[str]:
    if isinstance(module, nn.Module):
        by_id = {id(p): n for n, p in module.named_parameters()}
        return [by_id.get(id(p), str(j)) for j, p in enumerate(params)]
    return [str(j) for j in range(len(params))]


def _input_adjoint(o: Oracle, g: Tensor, z_in: Tensor) -> Tensor:
    """``Fᵀg`` in the shape of ``z_in``; from a deferred oracle's hints where it has them
    (its operators stay unmade)."""
    if isinstance(o, DeferredOracle) and not o.built:
        if o.linear is not None:  # F = W, one sample
            return (g.reshape(1, -1) @ o.linear[0]).reshape(z_in.shape)
        if o.diagonal is not None:  # F = diag(d)
            return o.diagonal[0].reshape(z_in.shape) * g
    return o.F.T.matmat(g.reshape(-1, 1)).reshape(z_in.shape)


def _gauss_newton(o: Oracle) -> Oracle:
    """The oracle with the second-order terms of the block dropped (a deferred oracle
    stays deferred, its hints without ``C`` and ``E``)."""
    if isinstance(o, DeferredOracle) and not o.built:
        linear = None if o.linear is None else (o.linear[0], o.linear[1], None)
        diagonal = None if o.diagonal is None else (o.diagonal[0], None)
        return DeferredOracle(lambda: _without_second_order(o), o.sizes, linear=linear, diagonal=diagonal)
    return _without_second_order(o)


def _without_second_order(o: Oracle) -> Oracle:
    a_in, _, p = o.sizes
    kw = dict(dtype=o.F.dtype, device=o.F.device)
    return Oracle(G=o.G, F=o.F, A=Zero(p, p, **kw), C=Zero(p, a_in, **kw), E=Zero(a_in, a_in, **kw))


def _check_oracle(o, i: int, module, z_in: Tensor, z_out: Tensor, p: int) -> None:
    if not isinstance(o, Oracle):
        raise TypeError(f"block {i} ({_name(module)}) returned {type(o).__name__} from oracle(), not an Oracle")
    a_in, a_out = z_in.numel(), z_out.numel()
    if isinstance(o, DeferredOracle) and not o.built:
        if o.sizes != (a_in, a_out, p):
            raise ValueError(
                f"the oracle of block {i} ({_name(module)}) has sizes (a_in, a_out, p) = {o.sizes}, "
                f"expected {(a_in, a_out, p)}"
            )
        return
    if (o.G.shape, o.F.shape, o.A.shape, o.C.shape, o.E.shape) == ((a_out, p), (a_out, a_in), (p, p), (p, a_in), (a_in, a_in)):
        return
    expected = {"G": (a_out, p), "F": (a_out, a_in), "A": (p, p), "C": (p, a_in), "E": (a_in, a_in)}
    for field, shape in expected.items():
        got = tuple(getattr(o, field).shape)
        if got != shape:
            raise ValueError(
                f"the oracle of block {i} ({_name(module)}) has {field} of shape {got}, expected {shape} "
                f"(a_in={a_in}, a_out={a_out}, p={p})"
            )
