"""The ``Block`` base class: a module's parameters, its evaluation and its oracle.

To write a block, subclass :class:`Block` and write
    * ``compute_oracle(z, values, g, *, second_order)`` — the oracle from checked,
      detached inputs (``values``: what ``checked_parameters`` returned);
    * ``output_shape(z, values)`` — the shape ``g`` must have;
    * optionally ``checked_parameters(z, params, where)`` (further checks of the input,
      and the parameters in the form ``compute_oracle`` reads them), ``forward`` (a direct
      formula) and ``oracle_bytes`` (what the oracle allocates).
Unwritten hooks fall back to ``torch.func`` (:mod:`tallskinny.blocks.func`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import NondeterministicModuleError
from .checks import check_adjoint, check_finite, check_input, check_params, describe
from .func import differ, func_oracle, func_oracle_bytes
from .protocol import Oracle

__all__ = ["Block", "FuncBlock"]


class Block:
    """A block that wraps an ``nn.Module`` mapping one tensor to one tensor.

    ``parameters()`` are the module's parameters that require grad, in
    ``module.named_parameters()`` order (the module's own tensors); parameters with
    ``requires_grad=False`` are constants, taken from the module. ``forward`` evaluates
    the module with :func:`torch.func.functional_call` at the given parameter values,
    on clones of its buffers, so nothing of the module changes (a ``BatchNorm`` in
    training mode updates the clones, not the model's running statistics).

    ``forward`` hands the module a copy of its input, so a module that changes its input
    in place (``x.tanh_()``, ``inplace=True``) leaves the caller's tensor as it was.

    ``oracle`` checks its inputs once and calls the hooks :meth:`checked_parameters`,
    :meth:`output_shape` and :meth:`compute_oracle`, whose defaults are the generic
    ``torch.func`` fallback: it differentiates :meth:`forward`. A subclass that overrides
    nothing is therefore correct for any module; an analytic block writes the hooks (or
    overrides :meth:`oracle` whole, and :meth:`forward` where a direct formula is
    simpler) and is registered with
    :func:`tallskinny.blocks.register`. The fallback evaluates the module twice at the
    point and raises :class:`~tallskinny.errors.NondeterministicModuleError` where the
    two outputs differ by more than rounding (a random module, e.g. dropout in training
    mode, has no derivatives).
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps an nn.Module, got {describe(module)}")
        self.module = module
        # θ is fixed when the block is made (like an optimizer's parameter list)
        named = list(module.named_parameters())
        self._all_parameters = dict(named)
        self._names = [name for name, p in named if p.requires_grad]
        self._parameters = [p for _, p in named if p.requires_grad]

    # -- parameters -------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        """Names (as in ``module.named_parameters()``) of the entries of θ, in order.

        θ is the set of parameters that required grad when the block was made."""
        return list(self._names)

    def parameters(self) -> list[Tensor]:
        """The module's parameters that require grad, in ``named_parameters()`` order."""
        return list(self._parameters)

    def parameter_values(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Every parameter of the module by name: ``params`` for θ, the module's own
        tensors for the frozen ones (``requires_grad=False``)."""
        values = dict(self._all_parameters)
        values.update(zip(self._names, params))
        return values

    # -- evaluation -------------------------------------------------------------------
    def forward(self, z: Tensor, params: Sequence[Tensor]) -> Tensor:
        """``z_out = f(z; θ)`` with θ = ``params``; differentiable w.r.t. ``z`` and ``params``."""
        where = self._where("forward")
        check_input(z, where)
        params = check_params(self._parameters, params, z, where)
        tensors = {name: buffer.clone() for name, buffer in self.module.named_buffers()}
        tensors.update(zip(self._names, params))
        # a module may change its input in place, declared (inplace=True) or not
        out = functional_call(self.module, tensors, (z.clone(),))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{where}: the module returned {describe(out)}; a block maps one tensor to one tensor"
            )
        return out

    # -- the oracle: checked here once, computed by the hooks ----------------------------
    def oracle(
        self, z: Tensor, params: Sequence[Tensor], g: Tensor, *, second_order: bool = True
    ) -> Oracle:
        """``G, F, A, C, E`` at ``(z, θ)`` contracted with ``g``.

        Checks ``z`` (a finite tensor), ``params`` (:meth:`checked_parameters`) and ``g``
        (against :meth:`output_shape`) once, then calls :meth:`compute_oracle` on detached
        tensors. Analytic blocks write the hooks; a block may still override ``oracle``."""
        where = self._where("oracle")
        values = self.checked_parameters(z, params, where)
        z = z.detach()
        check_finite(z, "z", where)
        shape = self.output_shape(z, values)
        if shape is not None:
            g = check_adjoint(g, shape, z, where).detach()
        return self.compute_oracle(z, values, g, second_order=second_order)

    # -- may be written (the hooks of :meth:`oracle`) ------------------------------------
    def checked_parameters(self, z: Tensor, params: Sequence[Tensor], where: str):
        """``z`` and ``params`` checked; returns what :meth:`compute_oracle` reads of the
        parameters (here: ``θ`` detached, in order)."""
        check_input(z, where)
        return [p.detach() for p in check_params(self._parameters, params, z, where)]

    def output_shape(self, z: Tensor, values) -> tuple[int, ...] | None:
        """The output's shape, against which ``g`` is checked; ``None`` where only
        :meth:`compute_oracle` knows it (then it checks ``g`` itself, as the fallback does)."""
        return None

    def compute_oracle(self, z: Tensor, values, g: Tensor, *, second_order: bool = True) -> Oracle:
        """The oracle from checked, detached inputs. Here the ``torch.func`` fallback on
        :meth:`forward`: exact for any module, dense in size."""
        where = self._where("oracle")
        params = values
        with torch.no_grad():
            out = self.forward(z, params)
            # a random module draws a new function at every call: one more forward pass
            # (cheap next to the Jacobians) tells it from a deterministic one
            again = self.forward(z, params)
        if differ(out, again):
            raise NondeterministicModuleError(
                f"{where}: two evaluations of {self.module._get_name()} at the same input and "
                "parameters differ; a random module (dropout in training mode, …) has no "
                "derivatives: call .eval() on it"
            )
        g = check_adjoint(g, out.shape, z, where).detach()
        return func_oracle(self.forward, z, params, g, second_order=second_order, where=where)

    def oracle_bytes(
        self, z_in: tuple[int, ...], z_out: tuple[int, ...], *, second_order: bool, itemsize: int
    ) -> tuple[int, int]:
        """Bytes :meth:`oracle` allocates at these shapes
        (:class:`~tallskinny.blocks.protocol.OracleMemory`): the fallback's
        (:func:`func_oracle_bytes`). A subclass that overrides :meth:`oracle` states its own;
        one that does not override this counts as ``(0, 0)`` (not stated)."""
        if type(self).oracle is not Block.oracle or type(self).compute_oracle is not Block.compute_oracle:
            return 0, 0
        p = sum(t.numel() for t in self._parameters)
        return func_oracle_bytes(math.prod(z_in), math.prod(z_out), p, second_order=second_order, itemsize=itemsize)

    # -- helpers ----------------------------------------------------------------------
    def _where(self, method: str) -> str:
        """``"Block(Module).method"`` for error messages (made once per method)."""
        names = self.__dict__.setdefault("_where_names", {})
        where = names.get(method)
        if where is None:
            where = names[method] = f"{type(self).__name__}({self.module._get_name()}).{method}"
        return where

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module!r})"


class FuncBlock(Block):
    """The block of an unregistered module: :class:`Block` with the ``torch.func`` fallback."""
